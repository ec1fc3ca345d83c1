"""One run's result: what training writes to summary.json, a sweep appends to results.jsonl, scripts.peer
writes for the reference trainer and scripts.report reads.

A field is None where the run's source does not know it (the reference trainer has no best step) or did not
record it (results written before the field existed); None fields are left out of the JSON, so a line holds
what is known.
"""

import dataclasses
import json
import math
import types
import typing
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
    def from_dict(cls, record: Any) -> "RunResult":
        """A results line or summary.json read back; raises DataError (without the file's name) if it is not a
        JSON object, lacks a required key, has a value of the wrong type (a number for the task), an adapters run
        without its adapter size, or a score that is not a finite number. Keys this version does not know are
        left out."""
        if not isinstance(record, Mapping):
            raise DataError(f"not a JSON object of a run's result: {json.dumps(record)}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise DataError(f"missing keys {missing}")
        score = record["score"]
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise DataError(f"score must be a finite number, got {score!r}")
        fields = {field.name: field.type for field in dataclasses.fields(cls)}
        for key, value in record.items():
            if key in fields and not _fits(value, fields[key]):
                raise DataError(f"{key} must be {_describe(fields[key])}, got {value!r}")
        if record["mode"] == "adapters" and record.get("adapter_size") is None:
            raise DataError("an adapters run without its adapter_size")
        return cls(**{key: value for key, value in record.items() if key in fields})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in field order, without the fields that are None."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @property
    def trainer(self) -> str:
        """Who trained the run: OUR_SOURCE, or the source it names."""
        return self.source or OUR_SOURCE


def _options(annotation: Any) -> tuple:
    """The types a field's annotation allows: `int | None` -> (int, NoneType)."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def _fits(value: Any, annotation: Any) -> bool:
    for option in _options(annotation):
        if option in (int, float):  # JSON numbers, not booleans
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif isinstance(value, typing.get_origin(option) or option):
            return True
    return False


def _describe(annotation: Any) -> str:
    names = {int: "a number", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(option, "a JSON object") for option in _options(annotation)))
