"""The Markdown the report scripts write: tables, and their cells."""

import math
from collections.abc import Iterable, Sequence


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    """`value` formatted by `spec`, "-" where it is unknown (None or NaN)."""
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)
