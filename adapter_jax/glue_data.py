"""Reading GLUE: the examples of a task's split from the original TSV files or from TFDS.

Host-side and model-free: what comes back are `Example`s, text and labels as GLUE has them; input_pipeline.py
turns them into batches.
"""

import dataclasses
import io
import math
import os

import numpy as np
from etils import epath

from adapter_jax import errors
from adapter_jax.tasks import Task


@dataclasses.dataclass(frozen=True)
class Example:
    idx: int
    text_a: str
    text_b: str | None
    label: int | float | None  # class index into task.labels, float for STS-B, None if unlabeled


def read_examples(
    task: Task,
    split: str,
    *,
    glue_dir: str | os.PathLike | None = None,
    source: str = "tsv",
    tfds_data_dir: str | os.PathLike | None = None,
) -> list[Example]:
    """All examples of `split` ('train', 'dev', 'test', 'dev_matched', ...) of `task`.

    source='tsv' reads <glue_dir>/<task.dir_name>/<file> as written by download_glue_data.py;
    source='tfds' reads the prepared TFDS dataset `task.tfds_name` (no TensorFlow needed).
    Test splits come back unlabeled whatever the source holds.
    """
    if split not in task.splits:
        raise errors.ConfigError(
            f"Task {task.name!r} has no split {split!r}; splits: {', '.join(task.splits)}"
        )
    if source == "tsv":
        if glue_dir is None:
            raise errors.ConfigError("glue_dir is required when source='tsv'")
        return _read_tsv(task, split, epath.Path(glue_dir))  # epath: a gs:// folder too
    if source == "tfds":
        return _read_tfds(task, split, tfds_data_dir)
    raise errors.ConfigError(f"Unknown source {source!r}; expected 'tsv' or 'tfds'")


def _read_tsv(task: Task, split: str, glue_dir: epath.Path) -> list[Example]:
    path = glue_dir / task.dir_name / task.splits[split]
    if not path.is_file():
        what = "folder" if not path.parent.is_dir() else "file"
        raise errors.DataError(
            f"GLUE {what} for task {task.name!r} (split {split!r}) not found: expected {path}"
        )
    # GLUE files hold quote characters inside fields (QNLI), so no CSV parser: split on "\n"
    # and "\t" only, after universal newlines. utf-8-sig drops the byte-order mark some MRPC copies
    # start with (decoded here: epath's read_text ignores its encoding argument).
    try:
        lines = io.TextIOWrapper(io.BytesIO(path.read_bytes()), encoding="utf-8-sig").read().split("\n")
    except UnicodeDecodeError as e:
        raise errors.DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if lines[-1] == "":
        lines.pop()
    is_test = split.startswith("test")
    has_header = task.headerless_columns is None or is_test
    header = tuple(lines.pop(0).split("\t")) if has_header and lines else task.headerless_columns
    if not lines:
        raise errors.DataError(f"{path}: no examples (task {task.name!r}, split {split!r})")
    first_line = 2 if has_header else 1  # file line number of the first example

    def column(name: str) -> int:
        if name not in header:
            raise errors.DataError(f"{path}: no column {name!r} in header {header}")
        return header.index(name)

    text_cols = [column(name) for name in task.text_columns]
    index_col = column(task.index_column) if is_test else None
    label_col = None if is_test or task.label_column is None else column(task.label_column)

    examples = []
    for position, line in enumerate(lines):
        where = f"{path}:{position + first_line}"
        fields = line.split("\t")
        if len(fields) != len(header):
            raise errors.DataError(
                f"{where}: expected {len(header)} tab-separated fields, found {len(fields)}"
            )
        texts = [fields[i] for i in text_cols]
        if index_col is None:
            idx = position
        else:
            idx = _parse(int, fields[index_col], where, f"{task.index_column!r} value")
        label = None if label_col is None else _parse_label(task, fields[label_col], where)
        examples.append(_example(idx, texts, label))
    return examples


def _example(idx: int, texts: list[str], label: float | None) -> Example:
    return Example(idx, texts[0], texts[1] if len(texts) > 1 else None, label)


def _parse(convert, value: str, where: str, what: str):
    try:
        return convert(value)
    except ValueError:
        raise errors.DataError(f"{where}: bad {what} {value!r}") from None


def _parse_label(task: Task, value: str, where: str) -> int | float:
    if task.labels is None:
        label = _parse(float, value, where, "regression label")
        if not math.isfinite(label):  # float() reads "nan" and "inf", which would poison the loss
            raise errors.DataError(f"{where}: bad regression label {value!r}")
        return label
    if value not in task.labels:
        raise errors.DataError(
            f"{where}: unknown label {value!r} for task {task.name!r}; expected one of {task.labels}"
        )
    return task.labels.index(value)


def _read_tfds(task: Task, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
    import tensorflow_datasets as tfds  # optional dependency: pip install adapter-jax[tfds]

    # TFDS registers its builders lazily; importing the module makes glue/* known by name.
    from tensorflow_datasets.text import glue  # noqa: F401

    tfds_split = task.tfds_splits[split]
    # No download: a reader on every host must not start fetching and preparing GLUE.
    try:
        data_source = tfds.data_source(task.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
    except NotImplementedError as e:  # what TFDS raises when no array_record copy is prepared
        raise errors.DataError(
            f"TFDS {task.tfds_name} (task {task.name!r}, split {tfds_split!r}) is not prepared in the "
            f"array_record format under data_dir={data_dir}: {e}"
        ) from e
    is_test = split.startswith("test")
    examples = []
    for record in data_source:
        texts = [_as_str(record[feature]) for feature in task.tfds_text_features]
        if is_test:
            label = None
        elif task.is_regression:
            label = float(record["label"])
        else:
            label = int(record["label"])
        examples.append(_example(int(record["idx"]), texts, label))
    if not examples:
        raise errors.DataError(f"TFDS {task.tfds_name} split {tfds_split!r} has no examples")
    # TFDS stores records shuffled; file order (idx) makes both sources agree row for row.
    return sorted(examples, key=lambda e: e.idx)


def _as_str(value) -> str:
    # Prepared datasets store text as bytes; tfds.testing.mock_data yields str.
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def train_subset_indices(num_examples: int, subset_size: int) -> np.ndarray:
    """A fixed subset (seed 0, not the run's seed), in file order, so every run of a sweep sees the same data."""
    return np.sort(np.random.default_rng(0).permutation(num_examples)[:subset_size])
