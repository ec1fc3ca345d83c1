"""What a setting read from a config or a file may hold: integers that are integers, numbers that are finite
and in range. validation.py checks the run's config with these, weights.py an HF config.json."""

import math
from collections.abc import Callable
from typing import Any


def positive_int(value: Any) -> bool:
    # bool is an int to Python, and no setting.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def number(
    low: float = -math.inf, high: float = math.inf, *, low_inclusive: bool = True, high_inclusive: bool = True
) -> Callable[[Any], bool]:
    """A check that a value is a finite number (not a bool) between `low` and `high`."""

    def check(value: Any) -> bool:
        # NaN fails every comparison; infinity would pass an open upper bound, and is no setting either.
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        above_low = low <= value if low_inclusive else low < value
        below_high = value <= high if high_inclusive else value < high
        return above_low and below_high

    return check
