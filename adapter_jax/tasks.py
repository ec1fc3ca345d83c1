"""The GLUE task registry: where each task's files live, their columns, labels, metrics and
leaderboard file names.

Columns are named by the files' headers, so one `text_columns` serves train, dev and test
(test files only add an index column and drop the label). Label order follows TFDS `glue/*`
so that a class index means the same thing whichever reader produced it.
"""

import dataclasses
import types
from collections.abc import Mapping

from adapter_jax import errors

BINARY = ("0", "1")
NLI_2 = ("entailment", "not_entailment")
NLI_3 = ("entailment", "neutral", "contradiction")

# CoLA's train/dev files have no header; these names stand in for one.
COLA_COLUMNS = ("source", "label", "original_label", "sentence")


@dataclasses.dataclass(frozen=True)
class Task:
    """One GLUE task, as laid out by `download_glue_data.py` and by TFDS `glue/<config>`."""

    name: str  # 'rte'
    dir_name: str  # 'RTE': the folder under the GLUE data dir
    text_columns: tuple[str, ...]  # one column for single sentences, two for pairs
    label_column: str | None  # None where no split has labels (AX)
    labels: tuple[str, ...] | None  # label strings as written in the TSV; None = regression
    metrics: tuple[str, ...]
    main_metric: str  # selects the best run; the metric the BERT and adapter papers report
    # Mapping fields are read-only views and stay out of the hash, so a Task can key a dict.
    splits: Mapping[str, str] = dataclasses.field(hash=False)  # split -> file name
    submission_files: Mapping[str, str] = dataclasses.field(hash=False)  # test split -> file
    tfds_name: str = ""
    tfds_splits: Mapping[str, str] = dataclasses.field(hash=False, default_factory=dict)
    tfds_text_features: tuple[str, ...] = ()  # same order as text_columns
    index_column: str = "index"  # test files' example id, echoed in the submission
    headerless_columns: tuple[str, ...] | None = None  # train/dev files without a header

    def __post_init__(self):
        for field in ("splits", "submission_files", "tfds_splits"):
            object.__setattr__(self, field, types.MappingProxyType(dict(getattr(self, field))))

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s.startswith("dev"))

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s.startswith("test"))

    def result_name(self, split: str) -> str:
        """The leaderboard column a split's score goes to: 'rte', or 'mnli_m' / 'mnli_mm'."""
        if split.endswith("_mismatched"):
            return f"{self.name}_mm"
        if split.endswith("_matched"):
            return f"{self.name}_m"
        return self.name


def _task(
    name: str,
    dir_name: str,
    text_columns: tuple[str, ...],
    tfds_text_features: tuple[str, ...],
    label_column: str | None,
    labels: tuple[str, ...] | None,
    submission_file: str,
    metrics: tuple[str, ...] = ("accuracy",),
    main_metric: str = "accuracy",
    **kwargs,
) -> Task:
    """A task with the usual train/dev/test files and TFDS splits."""
    return Task(
        name=name,
        dir_name=dir_name,
        text_columns=text_columns,
        label_column=label_column,
        labels=labels,
        metrics=metrics,
        main_metric=main_metric,
        splits={"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
        submission_files={"test": submission_file},
        tfds_name=f"glue/{name}",
        tfds_splits={"train": "train", "dev": "validation", "test": "test"},
        tfds_text_features=tfds_text_features,
        **kwargs,
    )


_PAIR = ("sentence1", "sentence2")
_NLI_PAIR = ("premise", "hypothesis")

_ALL = (
    _task(
        "cola", "CoLA", ("sentence",), ("sentence",), "label", BINARY, "CoLA.tsv",
        metrics=("matthews_corr",), main_metric="matthews_corr",
        headerless_columns=COLA_COLUMNS,
    ),
    _task("sst2", "SST-2", ("sentence",), ("sentence",), "label", BINARY, "SST-2.tsv"),
    _task(
        "mrpc", "MRPC", ("#1 String", "#2 String"), _PAIR, "Quality", BINARY, "MRPC.tsv",
        metrics=("f1", "accuracy"), main_metric="f1",
    ),
    _task(
        "stsb", "STS-B", _PAIR, _PAIR, "score", None, "STS-B.tsv",
        metrics=("pearson", "spearman"), main_metric="spearman",
    ),
    _task(
        "qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
        BINARY, "QQP.tsv", metrics=("f1", "accuracy"), main_metric="f1", index_column="id",
    ),
    Task(
        name="mnli",
        dir_name="MNLI",
        text_columns=_PAIR,
        label_column="gold_label",
        labels=NLI_3,
        metrics=("accuracy",),
        main_metric="accuracy",
        splits={
            "train": "train.tsv",
            "dev_matched": "dev_matched.tsv",
            "dev_mismatched": "dev_mismatched.tsv",
            "test_matched": "test_matched.tsv",
            "test_mismatched": "test_mismatched.tsv",
        },
        submission_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
        tfds_name="glue/mnli",
        tfds_splits={
            "train": "train",
            "dev_matched": "validation_matched",
            "dev_mismatched": "validation_mismatched",
            "test_matched": "test_matched",
            "test_mismatched": "test_mismatched",
        },
        tfds_text_features=_NLI_PAIR,
    ),
    _task("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", NLI_2,
          "QNLI.tsv"),
    _task("rte", "RTE", _PAIR, _PAIR, "label", NLI_2, "RTE.tsv"),
    _task("wnli", "WNLI", _PAIR, _PAIR, "label", BINARY, "WNLI.tsv"),
    # The diagnostic set has no training data: it is predicted with the MNLI model and scored
    # by the GLUE server with (multi-class) Matthews correlation.
    Task(
        name="ax",
        dir_name="diagnostic",
        text_columns=_PAIR,
        label_column=None,
        labels=NLI_3,
        metrics=("matthews_corr",),
        main_metric="matthews_corr",
        splits={"test": "diagnostic.tsv"},
        submission_files={"test": "AX.tsv"},
        tfds_name="glue/ax",
        tfds_splits={"test": "test"},
        tfds_text_features=_NLI_PAIR,
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in _ALL}

# The nine GLUE tasks, in the leaderboard's order: those with training data. AX, the diagnostic, has test
# data only; it is predicted with an MNLI model and scored apart.
GLUE_TASKS: tuple[str, ...] = tuple(task.name for task in _ALL if "train" in task.splits)

# The ten leaderboard columns that make up the GLUE score, named by `Task.result_name`: nine tasks, MNLI
# counted as two (matched and mismatched).
GLUE_SCORE_COLUMNS: tuple[str, ...] = tuple(
    TASKS[name].result_name(split) for name in GLUE_TASKS for split in TASKS[name].test_splits
)


def get_task(name: str) -> Task:
    """The task called `name` ('rte', 'mnli', ...); errors.ConfigError lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise errors.ConfigError(
            f"Unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}"
        ) from None


def prediction_tasks(task: Task) -> tuple[Task, ...]:
    """The tasks whose test sets a model trained on `task` predicts: MNLI's also predicts AX, as GLUE asks."""
    return (task, TASKS["ax"]) if task.name == "mnli" else (task,)
