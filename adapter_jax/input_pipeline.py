"""GLUE examples into batches: tokenize, then pack or bucket into [num_devices, per_device, length] numpy
arrays, each host taking its slice of the global batch, laid out as one `Layout` says.

Everything here is host-side numpy: the pipeline knows no model, only its tokenizer. A batch holds
input_ids, token_type_ids and segment_ids [devices, rows, length] (segment_ids: 0 at padding, else which
example of its row a token belongs to, counted from 1; one example per row unless packed), per-example
label, weight (0: a filler) and idx [devices, examples per device], and, packed, position_ids and cls_index.
"""

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import transformers

from adapter_jax import errors
from adapter_jax.glue_data import Example
from adapter_jax.tasks import Task

Batch = dict[str, np.ndarray]


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
# Layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """How examples are laid out in batches, for training and evaluation alike; built once from the config.

    Rows are max_seq_length tokens when packed (several examples each) and otherwise cut to the smallest of
    `buckets` that fits the batch's longest example. Each global batch is cut into process_count *
    num_devices equal shards; this host takes its num_devices of them.
    """

    global_batch_size: int  # training batches
    eval_batch_size: int
    num_devices: int  # this host's
    max_seq_length: int = 128
    buckets: tuple[int, ...] = (32, 64, 128)
    packing: bool = False
    process_index: int = dataclasses.field(default_factory=jax.process_index)
    process_count: int = dataclasses.field(default_factory=jax.process_count)

    def __post_init__(self):
        shards = self.process_count * self.num_devices
        for name in ("global_batch_size", "eval_batch_size"):
            size = getattr(self, name)
            if shards <= 0 or size <= 0 or size % shards:
                raise errors.ConfigError(
                    f"{name}={size} must be a positive multiple of "
                    f"process_count * num_devices = {self.process_count} * {self.num_devices}"
                )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Layout":
        """The config's layout over this host's local devices."""
        return cls(
            global_batch_size=config.global_batch_size,
            eval_batch_size=config.eval_batch_size,
            num_devices=jax.local_device_count(),
            max_seq_length=config.max_seq_length,
            buckets=tuple(config.buckets),
            packing=config.packing,
        )

    @property
    def bucket_lengths(self) -> np.ndarray:
        return bucket_lengths(self.buckets, self.max_seq_length)

    def check_fits(self, dataset: "TokenizedDataset") -> None:
        if dataset.max_seq_length != self.max_seq_length:
            raise ValueError(
                f"the dataset is tokenized to {dataset.max_seq_length} tokens, the layout's rows are {self.max_seq_length}"
            )


# ---------------------------------------------------------------------------------------------
# Batching


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
    real = np.arange(length) < dataset.lengths[rows][..., None]
    return {
        "input_ids": dataset.input_ids[rows, :length],
        "token_type_ids": dataset.token_type_ids[rows, :length],
        "segment_ids": real.astype(np.int32),  # one example, segment 1, per row
    }


def _packed_tokens(
    dataset: TokenizedDataset, shard_rows: np.ndarray, shard_weights: np.ndarray, local: slice
) -> Batch:
    """Each device's examples packed into rows of max_seq_length tokens (see BertModel's packed rows).

    Every device pads to the same row count, the smallest of packed_row_counts that fits the
    fullest device of the global batch. Fillers (weight 0) take no room; their cls_index is 0.
    """
    length = dataset.max_seq_length
    packings = []  # per device: the examples (positions in its shard) of each row
    for rows, weights in zip(shard_rows, shard_weights):
        real = np.flatnonzero(weights > 0)
        packings.append([real[members] for members in pack_rows(dataset.lengths[rows[real]].tolist(), length)])
    row_counts = packed_row_counts(shard_rows.shape[1])
    num_rows = int(row_counts[np.searchsorted(row_counts, max(len(packing) for packing in packings))])

    local_rows = shard_rows[local]
    shape = (len(local_rows), num_rows, length)
    tokens = {key: np.zeros(shape, np.int32) for key in ("input_ids", "token_type_ids", "segment_ids", "position_ids")}
    cls_index = np.zeros(local_rows.shape, np.int32)
    for device, (rows, packing) in enumerate(zip(local_rows, packings[local])):
        for row, members in enumerate(packing):
            start = 0
            for segment, member in enumerate(members, start=1):
                example = rows[member]
                end = start + dataset.lengths[example]
                tokens["input_ids"][device, row, start:end] = dataset.input_ids[example, : end - start]
                tokens["token_type_ids"][device, row, start:end] = dataset.token_type_ids[example, : end - start]
                tokens["segment_ids"][device, row, start:end] = segment
                tokens["position_ids"][device, row, start:end] = np.arange(end - start)
                cls_index[device, member] = row * length + start
                start = end
    return {**tokens, "cls_index": cls_index}


def _make_batch(dataset: TokenizedDataset, rows: np.ndarray, weights: np.ndarray, layout: Layout) -> Batch:
    """This host's slice of the global batch `rows` (weight 0: a filler), packed or bucketed.

    The global batch is cut into equal device shards, host by host, and its shapes are chosen over
    all of them, so that every host pads alike and the hosts' arrays assemble into one global array.
    Labels, weights and ids are per example, [devices, examples per device], whichever the layout.
    """
    shards = layout.process_count * layout.num_devices
    shard_rows, shard_weights = rows.reshape(shards, -1), weights.reshape(shards, -1)
    local = slice(layout.process_index * layout.num_devices, (layout.process_index + 1) * layout.num_devices)
    if layout.packing:
        tokens = _packed_tokens(dataset, shard_rows, shard_weights, local)
    else:
        tokens = _bucketed_tokens(dataset, shard_rows, shard_weights, local, layout.bucket_lengths)
    rows, weights = shard_rows[local], shard_weights[local]
    return {
        **tokens,
        "label": dataset.labels[rows],
        "weight": weights.astype(np.float32),
        # Rows of `dataset` (dataset.idx[row] is the example id); -1 marks fillers.
        "idx": np.where(weights > 0, rows, -1),
    }


class TrainIterator:
    """Endless shuffled training batches, resumable from `state()`.

    Epoch e visits the examples in the order of a permutation drawn from (seed, e), dropping the last
    partial batch; each batch holds layout.global_batch_size examples. `epoch` is the current epoch and
    `step` the index of the next batch within it, so `restore(state())` continues with exactly the
    batches that would have come next.
    """

    def __init__(self, dataset: TokenizedDataset, layout: Layout, *, seed: int):
        layout.check_fits(dataset)
        self.steps_per_epoch = len(dataset) // layout.global_batch_size
        if self.steps_per_epoch == 0:
            raise errors.ConfigError(
                f"global_batch_size={layout.global_batch_size} is larger than the dataset "
                f"({len(dataset)} examples): an epoch would have no full batch"
            )
        self.dataset = dataset
        self.layout = layout
        self.seed = seed
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
        size = self.layout.global_batch_size
        rows = self._epoch_order()[self.step * size : (self.step + 1) * size]
        batch = _make_batch(self.dataset, rows, np.ones(len(rows), np.float32), self.layout)
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


def eval_batches(dataset: TokenizedDataset, layout: Layout) -> Iterator[Batch]:
    """Every example once, in dataset order, in batches of layout.eval_batch_size; `idx` holds each
    example's row in `dataset`.

    The last batch is filled with weight-0 copies of row 0 (idx -1), so that shapes stay static;
    unpacked, no row is then entirely padding. A batch far larger than the dataset is cut to fit it, each
    shard's part to the next power of two (so datasets of similar sizes share a compiled program):
    eval_batch_size is a ceiling for one config's many datasets (MNLI's 9,815 dev examples, WNLI's 71), and the
    rows past the dataset would be padding alone, costing memory and time, not changing a score.
    """
    layout.check_fits(dataset)
    shards = layout.process_count * layout.num_devices
    per_shard = -(-len(dataset) // shards)
    size = min(layout.eval_batch_size, shards * (1 << (per_shard - 1).bit_length()))

    def generate() -> Iterator[Batch]:
        for start in range(0, len(dataset), size):
            rows = np.arange(start, start + size)
            weights = (rows < len(dataset)).astype(np.float32)
            yield _make_batch(dataset, np.where(weights > 0, rows, 0), weights, layout)

    # A plain function around the generator, so that a dataset that does not fit fails here, not at first use.
    return generate()
