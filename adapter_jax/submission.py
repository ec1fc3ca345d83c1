"""GLUE leaderboard files: one `index<TAB>prediction` TSV per test split, named as
gluebenchmark.com expects (RTE.tsv, MNLI-m.tsv, AX.tsv, ...); zip the folder to submit.

Predictions are written as the labels appear in the task's TSV files: label names for
RTE/QNLI/MNLI/AX, 0/1 for CoLA/SST-2/MRPC/QQP/WNLI, and a float for STS-B.
"""

import numpy as np
from etils import epath

from adapter_jax import errors
from adapter_jax.tasks import Task, prediction_tasks
from adapter_jax.workdir import write_atomic, writing

HEADER = ("index", "prediction")


def expected_files(task: Task) -> list[str]:
    """The leaderboard files a model trained on `task` predicts (for MNLI, AX's too)."""
    return [t.submission_files[split] for t in prediction_tasks(task) for split in t.test_splits]


def write_submission(
    task: Task,
    split: str,
    idx: np.ndarray,
    predictions: np.ndarray,
    out_dir: epath.PathLike,
) -> epath.Path:
    """Writes <out_dir>/<task.submission_files[split]>; predictions are class indices (floats
    for STS-B) aligned with `idx`, the test file's example ids. Rows come out sorted by id."""
    if split not in task.submission_files:
        raise errors.ConfigError(
            f"Task {task.name!r} has no test split {split!r}; test splits: {', '.join(task.submission_files)}"
        )
    idx, predictions = np.asarray(idx), np.asarray(predictions)
    if idx.shape != predictions.shape or idx.ndim != 1:
        raise errors.DataError(f"{task.name} {split}: idx {idx.shape} and predictions {predictions.shape} differ")
    if len(np.unique(idx)) != len(idx):
        raise errors.DataError(f"{task.name} {split}: duplicate example ids in idx")
    if task.is_regression:
        values = [repr(float(p)) for p in predictions]
    else:
        if not np.all((predictions >= 0) & (predictions < task.num_labels)):
            raise errors.DataError(f"{task.name} {split}: predictions outside 0..{task.num_labels - 1}")
        values = [task.labels[int(p)] for p in predictions]
    order = np.argsort(idx, kind="stable")
    lines = ["\t".join(HEADER)] + [f"{idx[i]}\t{values[i]}" for i in order]

    out_dir = epath.Path(out_dir)  # a bucket (gs://...) as well as a local folder
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: a crash mid-write never leaves a truncated file to be uploaded.
    return write_atomic(out_dir / task.submission_files[split], "\n".join(lines) + "\n")


def read_submission(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(idx int64, predictions as the strings written) from a leaderboard file."""
    path = epath.Path(path)
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if tuple(lines[0].split("\t")) != HEADER:
        raise errors.DataError(f"{path}:1: expected header {'<TAB>'.join(HEADER)!r}, found {lines[0]!r}")
    idx, predictions = [], []
    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].isdigit():
            raise errors.DataError(f"{path}:{line_number}: expected '<index>\\t<prediction>', found {line!r}")
        idx.append(int(fields[0]))
        predictions.append(fields[1])
    return np.array(idx, np.int64), np.array(predictions, dtype=str)
