"""One run's result: what training writes to summary.json, a sweep appends to results.jsonl, scripts.peer
writes for the reference trainer and scripts.report reads.

A field is None where the run's source does not know it (the reference trainer has no best step) or did not
record it (results written before the field existed); None fields are left out of the JSON, so a line holds
what is known.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from adapter_jax.errors import DataError

OUR_SOURCE = "adapter-jax"
REQUIRED_KEYS = ("task", "mode", "score")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResult:
    """One run: its settings, its best dev score and metrics, and its cost."""

    task: str
    mode: str
    model: str | None = None
    adapter_size: int | None = None  # 0 unless mode is "adapters"
    learning_rate: float | None = None
    num_epochs: float | None = None  # the epochs that ran: fewer or more when num_train_steps set the length
    num_train_steps: int | None = None  # the steps that ran
    seed: int | None = None
    top_k: int | None = None
    main_metric: str | None = None
    score: float  # the best dev value of the task's main metric
    best_step: int | None = None
    dev_metrics: Mapping[str, float] | None = None  # the best step's, MNLI mismatched's as "dev_mismatched/..."
    all_dev_metrics: Mapping[str, Mapping[str, float]] | None = None  # split -> metric -> value, the best step's
    final_dev_metrics: Mapping[str, Mapping[str, float]] | None = None  # the same, of the last step
    skipped_steps: int | None = None
    wall_time_s: float | None = None
    total_params: int | None = None
    base_params: int | None = None
    trainable_params: int | None = None
    trainable_fraction: float | None = None  # trainable_params / base_params
    train_examples_per_s: float | None = None
    max_train_examples: int | None = None
    workdir: str | None = None  # a sweep's run folder
    source: str | None = None  # who trained it; None for ours (OUR_SOURCE)
    library: str | None = None  # the reference trainer's library and version
    test_predictions_dir: str | None = None  # the run's GLUE test predictions, where a sweep wrote them

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "RunResult":
        """A results line or summary.json read back; raises DataError (without the file's name) if it lacks
        a required key or its score is not a finite number. Keys this version does not know are left out."""
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise DataError(f"missing keys {missing}")
        score = record["score"]
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"score must be a finite number, got {score!r}")
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in field order, without the fields that are None."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @property
    def trainer(self) -> str:
        """Who trained the run: OUR_SOURCE, or the source it names."""
        return self.source or OUR_SOURCE
