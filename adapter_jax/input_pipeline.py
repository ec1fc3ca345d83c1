"""GLUE input pipeline: read examples (GLUE TSV or TFDS), tokenize, and batch them into
[num_devices, per_device, length] numpy arrays, each host taking its slice of the global batch.

Everything here is host-side numpy: the pipeline knows no model, only its tokenizer.
"""

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
import transformers

from adapter_jax import errors
from adapter_jax.tasks import Task

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Example:
    idx: int
    text_a: str
    text_b: str | None
    label: int | float | None  # class index into task.labels, float for STS-B, None if unlabeled


# ---------------------------------------------------------------------------------------------
# Reading


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
        return _read_tsv(task, split, pathlib.Path(glue_dir))
    if source == "tfds":
        return _read_tfds(task, split, tfds_data_dir)
    raise errors.ConfigError(f"Unknown source {source!r}; expected 'tsv' or 'tfds'")


def _read_tsv(task: Task, split: str, glue_dir: pathlib.Path) -> list[Example]:
    path = glue_dir / task.dir_name / task.splits[split]
    if not path.is_file():
        what = "folder" if not path.parent.is_dir() else "file"
        raise errors.DataError(
            f"GLUE {what} for task {task.name!r} (split {split!r}) not found: expected {path}"
        )
    # GLUE files hold quote characters inside fields (QNLI), so no CSV parser: split on "\n"
    # and "\t" only. utf-8-sig drops the byte-order mark some MRPC copies start with.
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
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


# ---------------------------------------------------------------------------------------------
# Tokenization


@dataclasses.dataclass
class TokenizedDataset:
    """Token ids zero-padded to max_seq_length; `lengths` counts the real tokens of each row."""

    input_ids: np.ndarray  # int32 [N, max_seq_length]
    token_type_ids: np.ndarray  # int32 [N, max_seq_length]
    lengths: np.ndarray  # int32 [N]
    labels: np.ndarray  # int32 (-1 unlabeled) or float32 (nan unlabeled) [N]
    idx: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def max_seq_length(self) -> int:
        return self.input_ids.shape[1]


def load_tokenizer(model_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The fast (Rust) tokenizer saved with a BERT checkpoint folder."""
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)


def tokenize(
    task: Task,
    examples: Sequence[Example],
    tokenizer: transformers.PreTrainedTokenizerFast,
    max_seq_length: int = 128,
) -> TokenizedDataset:
    """[CLS] a [SEP] (b [SEP]) token ids; pairs are cut longest-first, as BERT's run_classifier does.

    Labels are float32 targets (NaN unlabeled) for a regression task and int32 class indices (-1
    unlabeled) otherwise; a label that is no class index of `task` raises errors.DataError.
    """
    if not examples:
        raise errors.DataError("tokenize: no examples")
    texts_a = [e.text_a for e in examples]
    texts_b = None if examples[0].text_b is None else [e.text_b for e in examples]
    encoded = tokenizer(
        texts_a,
        texts_b,
        truncation="longest_first",
        max_length=max_seq_length,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int32)
    input_ids = np.zeros((len(examples), max_seq_length), np.int32)
    token_type_ids = np.zeros((len(examples), max_seq_length), np.int32)
    for row, (ids, type_ids) in enumerate(zip(encoded["input_ids"], encoded["token_type_ids"])):
        input_ids[row, : len(ids)] = ids
        token_type_ids[row, : len(type_ids)] = type_ids

    if task.is_regression:
        labels = np.array([np.nan if e.label is None else e.label for e in examples], np.float32)
    else:
        # `in range` compares by value, so a class index read as a float (1.0) is still one.
        wrong = [e.label for e in examples if e.label is not None and e.label not in range(task.num_labels)]
        if wrong:
            raise errors.DataError(
                f"tokenize: labels {wrong[:5]} are not class indices of task {task.name!r} (0..{task.num_labels - 1})"
            )
        labels = np.array([-1 if e.label is None else e.label for e in examples], np.int32)
    idx = np.array([e.idx for e in examples], np.int64)
    return TokenizedDataset(input_ids, token_type_ids, lengths, labels, idx)


# ---------------------------------------------------------------------------------------------
# Batching


def _check_batch_size(global_batch_size: int, num_devices: int, process_count: int) -> None:
    shards = process_count * num_devices
    if shards <= 0 or global_batch_size <= 0 or global_batch_size % shards:
        raise errors.ConfigError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count * num_devices = {process_count} * {num_devices}"
        )


def bucket_lengths(buckets: Iterable[int], max_seq_length: int) -> np.ndarray:
    """The sorted batch lengths to pad to, capped at (and including) `max_seq_length`, so every example fits."""
    return np.array(sorted({min(b, max_seq_length) for b in buckets} | {max_seq_length}))


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Positions of `lengths` grouped into rows of at most `row_length` tokens, first-fit decreasing.

    Each position lands in exactly one row, whole; the longest go first, ties in batch order, and each
    goes into the first row with room for it, so rows are few (at most 11/9 of the optimum plus one).
    """
    if any(length > row_length for length in lengths):
        raise ValueError(f"an example is longer than the row length {row_length}: {max(lengths)}")
    order = sorted(range(len(lengths)), key=lambda position: -lengths[position])
    rows: list[list[int]] = []
    room: list[int] = []
    for position in order:
        fitting = next((row for row, free in enumerate(room) if lengths[position] <= free), len(rows))
        if fitting == len(rows):
            rows.append([])
            room.append(row_length)
        rows[fitting].append(position)
        room[fitting] -= lengths[position]
    return rows


def packed_row_counts(examples_per_device: int) -> np.ndarray:
    """The row counts a device's packed examples are padded to: eighths of the examples, rounded up.

    A step compiles once per row count, so at most eight times; one row per example always fits.
    """
    return np.array(sorted({math.ceil(examples_per_device * eighths / 8) for eighths in range(1, 9)}))


def _bucketed_tokens(
    dataset: TokenizedDataset, shard_rows: np.ndarray, shard_weights: np.ndarray, local: slice, buckets: np.ndarray
) -> Batch:
    """One example per row, cut to the bucket of the longest example of the global batch."""
    longest = dataset.lengths[shard_rows[shard_weights > 0]].max()
    length = int(buckets[np.searchsorted(buckets, longest)])
    rows = shard_rows[local]
    mask = np.arange(length) < dataset.lengths[rows][..., None]
    return {
        "input_ids": dataset.input_ids[rows, :length],
        "token_type_ids": dataset.token_type_ids[rows, :length],
        "attention_mask": mask.astype(np.int32),
    }


def _packed_tokens(
    dataset: TokenizedDataset, shard_rows: np.ndarray, shard_weights: np.ndarray, local: slice
) -> Batch:
    """Each device's examples packed into rows of max_seq_length tokens (see BertModel's packed rows).

    Every device pads to the same row count, the smallest of packed_row_counts that fits the
    fullest device of the global batch. Fillers (weight 0) take no room; their cls_index is 0.
    """
    length = dataset.max_seq_length
    layouts = []
    for rows, weights in zip(shard_rows, shard_weights):
        real = np.flatnonzero(weights > 0)
        layouts.append([real[members] for members in pack_rows(dataset.lengths[rows[real]].tolist(), length)])
    row_counts = packed_row_counts(shard_rows.shape[1])
    num_rows = int(row_counts[np.searchsorted(row_counts, max(len(layout) for layout in layouts))])

    local_rows = shard_rows[local]
    shape = (len(local_rows), num_rows, length)
    tokens = {key: np.zeros(shape, np.int32) for key in ("input_ids", "token_type_ids", "attention_mask", "position_ids")}
    cls_index = np.zeros(local_rows.shape, np.int32)
    for device, (rows, layout) in enumerate(zip(local_rows, layouts[local])):
        for row, members in enumerate(layout):
            start = 0
            for segment, member in enumerate(members, start=1):
                example = rows[member]
                end = start + dataset.lengths[example]
                tokens["input_ids"][device, row, start:end] = dataset.input_ids[example, : end - start]
                tokens["token_type_ids"][device, row, start:end] = dataset.token_type_ids[example, : end - start]
                tokens["attention_mask"][device, row, start:end] = segment
                tokens["position_ids"][device, row, start:end] = np.arange(end - start)
                cls_index[device, member] = row * length + start
                start = end
    return {**tokens, "cls_index": cls_index}


def _make_batch(
    dataset: TokenizedDataset,
    rows: np.ndarray,
    weights: np.ndarray,
    *,
    packing: bool,
    buckets: np.ndarray,
    process_index: int,
    process_count: int,
    num_devices: int,
) -> Batch:
    """This host's slice of the global batch `rows` (weight 0: a filler), packed or bucketed.

    The global batch is cut into equal device shards, host by host, and its shapes are chosen over
    all of them, so that every host pads alike and the hosts' arrays assemble into one global array.
    Labels, weights and ids are per example, [devices, examples per device], whichever the layout.
    """
    shards = process_count * num_devices
    shard_rows, shard_weights = rows.reshape(shards, -1), weights.reshape(shards, -1)
    local = slice(process_index * num_devices, (process_index + 1) * num_devices)
    if packing:
        tokens = _packed_tokens(dataset, shard_rows, shard_weights, local)
    else:
        tokens = _bucketed_tokens(dataset, shard_rows, shard_weights, local, buckets)
    rows, weights = shard_rows[local], shard_weights[local]
    return {
        **tokens,
        "label": dataset.labels[rows],
        "weight": weights.astype(np.float32),
        # Rows of `dataset` (dataset.idx[row] is the example id); -1 marks fillers.
        "idx": np.where(weights > 0, rows, -1),
    }


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What a sequence of batches costs: token slots computed on, real tokens among them, and shapes."""

    batches: int
    token_slots: int
    real_tokens: int
    shapes: frozenset  # each distinct batch signature ((key, shape), ...): a jitted step compiles once per

    @property
    def padded_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.token_slots

    @property
    def compiled_shapes(self) -> int:
        return len(self.shapes)


def batch_stats(batches: Iterable[Batch]) -> BatchStats:
    """The padded-token fraction and distinct shapes of `batches`; fillers' tokens count as padding."""
    count = token_slots = real_tokens = 0
    shapes = set()
    for batch in batches:
        count += 1
        token_slots += batch["attention_mask"].size
        real_tokens += _real_tokens(batch)
        shapes.add(tuple(sorted((key, value.shape) for key, value in batch.items())))
    return BatchStats(count, token_slots, real_tokens, frozenset(shapes))


def _real_tokens(batch: Batch) -> int:
    if "cls_index" in batch:  # packed: fillers take no room
        return int(np.count_nonzero(batch["attention_mask"]))
    return int(np.count_nonzero(batch["attention_mask"][batch["weight"] > 0]))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


class TrainIterator:
    """Endless shuffled training batches, resumable from `state()`.

    Epoch e visits the examples in the order of a permutation drawn from (seed, e), dropping
    the last partial batch. Each batch holds global_batch_size examples, packed into rows of
    max_seq_length tokens (`packing`) or one per row, padded to the smallest of `buckets` that
    fits. `epoch` is the current epoch and `step` the index of the next batch within it, so
    `restore(state())` continues with exactly the batches that would have come next.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        *,
        global_batch_size: int,
        num_devices: int,
        seed: int,
        buckets: Sequence[int] = (32, 64, 128),
        packing: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count = _process(process_index, process_count)
        _check_batch_size(global_batch_size, num_devices, self.process_count)
        self.steps_per_epoch = len(dataset) // global_batch_size
        if self.steps_per_epoch == 0:
            raise errors.ConfigError(
                f"global_batch_size={global_batch_size} is larger than the dataset "
                f"({len(dataset)} examples): an epoch would have no full batch"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.num_devices = num_devices
        self.seed = seed
        self.buckets = bucket_lengths(buckets, dataset.max_seq_length)
        self.packing = packing
        self.epoch = 0
        self.step = 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            self._order_epoch, self._order = self.epoch, rng.permutation(len(self.dataset))
        return self._order

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        start = self.step * self.global_batch_size
        rows = self._epoch_order()[start : start + self.global_batch_size]
        batch = _make_batch(
            self.dataset,
            rows,
            np.ones(len(rows), np.float32),
            packing=self.packing,
            buckets=self.buckets,
            process_index=self.process_index,
            process_count=self.process_count,
            num_devices=self.num_devices,
        )
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def restore(self, state: dict[str, int]) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise errors.CheckpointError(
                f"Input pipeline state {state} does not fit this dataset "
                f"({self.steps_per_epoch} steps per epoch)"
            )
        self.epoch, self.step = epoch, step


def eval_batches(
    dataset: TokenizedDataset,
    *,
    global_batch_size: int,
    num_devices: int,
    buckets: Sequence[int] = (32, 64, 128),
    packing: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Every example once, in dataset order; `idx` holds each example's row in `dataset`.

    Batches are laid out as TrainIterator's. The last batch is filled with weight-0 copies of row 0
    (idx -1), so that shapes stay static; unpacked, no row is then entirely masked.
    """
    process_index, process_count = _process(process_index, process_count)
    _check_batch_size(global_batch_size, num_devices, process_count)
    lengths = bucket_lengths(buckets, dataset.max_seq_length)

    def generate() -> Iterator[Batch]:
        for start in range(0, len(dataset), global_batch_size):
            rows = np.arange(start, start + global_batch_size)
            weights = (rows < len(dataset)).astype(np.float32)
            yield _make_batch(
                dataset,
                np.where(weights > 0, rows, 0),
                weights,
                packing=packing,
                buckets=lengths,
                process_index=process_index,
                process_count=process_count,
                num_devices=num_devices,
            )

    # A plain function around the generator, so bad arguments fail here and not at first use.
    return generate()
