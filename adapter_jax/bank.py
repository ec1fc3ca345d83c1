"""An adapter bank: many tasks' exports on one frozen base model, and one forward pass over a batch mixing them.

A Houlsby task owns its adapters, every LayerNorm's scale and bias, its head and (where it trained one) its
pooler; the rest of BERT is shared. The bank keeps the shared weights once and each task's own parameters in
a slot of arrays stacked along a task axis of fixed length (the capacity). Loading, replacing or removing a
task writes a slot and changes no shape, so nothing recompiles; batches are padded to a few fixed sizes and
bucketed lengths, so only those shapes ever compile.

Slots are padded to the bank's largest shapes, exactly: the adapter bottleneck with zeros (a zero
down-projection column gives gelu(0) = 0 and a zero up-projection row adds nothing), the head to three outputs
(the extra logits are cut off), and a site where a task has no adapter holds an all-zero adapter, the identity.
A task that kept the pooler frozen holds the base model's pooler in its slot.

The mixed forward gathers each example's slot out of the stacked parameters and runs the single-task model
under jax.vmap over examples. The frozen weights are not batched, so their matmuls stay the single-task ones;
per-example adapters, pooler and head become batched matmuls and LayerNorm scales broadcasts. Gathering was
chosen over a one-hot einsum over slots by measurement (scripts/bank_benchmark.py, docs/performance.md).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from adapter_jax import export, glue_data, input_pipeline, tasks, trainable, weights
from adapter_jax.adapters import AdapterConfig
from adapter_jax.errors import CheckpointError, ConfigError
from adapter_jax.modeling import BertForSequenceClassification

# Modes whose exports leave the rest of BERT as the base model's; top_k and full change shared weights.
SERVABLE_MODES = ("adapters", "layernorm")
# What a slot holds: whatever a servable mode may train, the pooler included; the rest is held once.
SLOT_PATTERNS = tuple(
    dict.fromkeys(pattern for mode in SERVABLE_MODES for pattern in trainable.TRAINABLE_PATTERNS[mode])
) + (trainable.POOLER,)
MAX_LABELS = max(task.num_labels for task in tasks.TASKS.values())


@dataclasses.dataclass(frozen=True)
class Slot:
    """A loaded task: where its parameters are, which GLUE task its head answers, how it tokenizes."""

    index: int
    task: tasks.Task
    max_seq_length: int
    source: str  # the export file, for messages


def per_example_logits(
    model: BertForSequenceClassification,
    shared: Mapping[str, Any],
    example_params: Mapping[str, Any],
    input_ids: jax.Array,
    token_type_ids: jax.Array,
    attention_mask: jax.Array,
) -> jax.Array:
    """Logits [B, labels] where example b runs `model` with `shared` plus its own row b of `example_params`."""

    def one_example(params, ids, type_ids, mask):
        variables = {"params": trainable.merge(params, shared)}
        return model.apply(variables, ids[None], type_ids[None], mask[None])[0]

    return jax.vmap(one_example)(example_params, input_ids, token_type_ids, attention_mask)


def gathered_logits(
    model: BertForSequenceClassification,
    shared: Mapping[str, Any],
    slots: Mapping[str, Any],
    slot_ids: jax.Array,
    input_ids: jax.Array,
    token_type_ids: jax.Array,
    attention_mask: jax.Array,
) -> jax.Array:
    """per_example_logits with each example's parameters gathered from the stacked `slots` by `slot_ids`."""
    example_params = jax.tree.map(lambda stacked: stacked[slot_ids], slots)
    return per_example_logits(model, shared, example_params, input_ids, token_type_ids, attention_mask)


def _write_slot(slots: Mapping[str, Any], index: jax.Array, params: Mapping[str, Any]) -> dict:
    return jax.tree.map(lambda stacked, leaf: stacked.at[index].set(leaf), slots, params)


def _padded_into(shapes: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """`params` zero-padded to the leaf shapes of `shapes`; leaves `params` lacks are all zeros."""
    given = traverse_util.flatten_dict(params)
    padded = {}
    for path, shape in traverse_util.flatten_dict(shapes).items():
        padded[path] = np.zeros(shape.shape, np.float32)
        if path in given:
            leaf = np.asarray(given[path], np.float32)
            padded[path][tuple(slice(0, size) for size in leaf.shape)] = leaf
    return traverse_util.unflatten_dict(padded)


class AdapterBank:
    """Task exports on one base model, answered together: `load` fills a slot, `logits` scores a mixed batch.

    capacity:         task slots; loading into a full bank is refused.
    max_adapter_size: the largest bottleneck the bank holds; an export with a larger one is refused.
    max_seq_length:   the longest tokenization the bank takes; an export tokenizing longer is refused.
    batch_sizes:      the batch sizes that compile; a batch is padded to the smallest that holds it.
    buckets:          the sequence lengths that compile (capped at max_seq_length), as in training.
    """

    def __init__(
        self,
        model: str,
        *,
        capacity: int,
        max_adapter_size: int,
        max_seq_length: int = 128,
        batch_sizes: Sequence[int] = (8, 64),
        buckets: Sequence[int] = (32, 64, 128),
    ):
        self.model_folder = weights.open_model_folder(model)
        bert_config = self.model_folder.config
        if not 0 <= max_adapter_size <= bert_config.hidden_size:
            raise ConfigError(f"max_adapter_size {max_adapter_size} is not in 0..{bert_config.hidden_size}")
        if capacity < 1 or not batch_sizes or min(batch_sizes) < 1:
            raise ConfigError(f"capacity {capacity} and batch_sizes {tuple(batch_sizes)} must be positive")
        self.capacity = capacity
        self.max_adapter_size = max_adapter_size
        self.max_seq_length = max_seq_length
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.buckets = input_pipeline.bucket_lengths(buckets, max_seq_length)
        self.tokenizer = input_pipeline.load_tokenizer(self.model_folder.path)
        # Every site of every layer has an adapter slot: a task without one there holds zeros.
        self.model = BertForSequenceClassification(bert_config, AdapterConfig(size=max_adapter_size), MAX_LABELS)
        shapes = weights.abstract_params(self.model)
        self._slot_shapes, _ = trainable.split(shapes, trainable.matches(shapes, SLOT_PATTERNS))
        _, pretrained = weights.load_pretrained(self.model_folder)
        self._model_name = model
        self._base_fingerprint = weights.fingerprint(pretrained)
        base = {"bert": pretrained}
        # The base's own LayerNorms and pooler: what a task that did not train them uses.
        self._base_owned, shared = trainable.split(base, trainable.matches(base, SLOT_PATTERNS))
        self._shared = jax.device_put(shared)
        self._slots = jax.tree.map(lambda s: jnp.zeros((capacity, *s.shape), s.dtype), self._slot_shapes)
        self._tasks: dict[str, Slot] = {}
        self._logits_step = jax.jit(gathered_logits, static_argnums=0)
        self._write_step = jax.jit(_write_slot)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    @property
    def shared_params(self) -> dict:
        """The frozen base weights, once."""
        return self._shared

    @property
    def slot_params(self) -> dict:
        """Every task-owned parameter, stacked along a leading axis of `capacity` slots."""
        return self._slots

    def slot(self, name: str) -> Slot:
        if name not in self._tasks:
            raise ConfigError(f"unknown task {name!r}; loaded: {', '.join(self._tasks) or 'none'}")
        return self._tasks[name]

    @classmethod
    def holding(
        cls, exports: Mapping[str, export.Export], model: str | None = None, *, capacity: int = 0, **options: Any
    ) -> "AdapterBank":
        """A bank on `model` (default: the base the first export names) sized to hold `exports`, each loaded
        under its name; at least `capacity` slots. `options`: the rest of the constructor's (batch_sizes, ...)."""
        specs = [exported.spec for exported in exports.values()]
        bank = cls(
            model or specs[0].model,
            capacity=max(capacity, len(exports)),
            max_adapter_size=max(spec.adapter.size for spec in specs),
            max_seq_length=max(spec.max_seq_length for spec in specs),
            **options,
        )
        for name, exported in exports.items():
            bank.load(name, exported)
        return bank

    def load(self, name: str, source: epath.PathLike | export.Export) -> Slot:
        """Puts an export (read already, or at a path: file, export folder or training workdir) in `name`'s
        slot, or a free one.

        Refuses (errors.CheckpointError naming the file) an export of another base model, one whose shapes do
        not match its settings, one that changed shared weights (top_k, full), and one larger than the bank.
        """
        exported = source if isinstance(source, export.Export) else export.read(source)
        spec = exported.spec
        if spec.mode not in SERVABLE_MODES:
            raise CheckpointError(
                f"adapter export {exported.source} was trained in mode {spec.mode!r}, which changes the shared "
                f"weights; a bank serves modes {SERVABLE_MODES}"
            )
        if spec.adapter.size > self.max_adapter_size or spec.max_seq_length > self.max_seq_length:
            raise CheckpointError(
                f"adapter export {exported.source} has adapter size {spec.adapter.size} and max_seq_length "
                f"{spec.max_seq_length}; this bank holds at most {self.max_adapter_size} and {self.max_seq_length}"
            )
        export.check_fits(exported, model=self._model_name, base_fingerprint=self._base_fingerprint,
                          bert_config=self.model_folder.config)
        owned = trainable.merge(exported.params, self._base_owned)
        index = self._tasks[name].index if name in self._tasks else self._free_slot(str(exported.source))
        self._slots = self._write_step(self._slots, jnp.int32(index), _padded_into(self._slot_shapes, owned))
        self._tasks[name] = Slot(index, tasks.get_task(spec.task), spec.max_seq_length, str(exported.source))
        return self._tasks[name]

    def _free_slot(self, source: str) -> int:
        taken = {slot.index for slot in self._tasks.values()}
        free = [index for index in range(self.capacity) if index not in taken]
        if not free:
            raise ConfigError(f"cannot load {source}: all {self.capacity} slots of the bank are taken")
        return free[0]

    def remove(self, name: str) -> None:
        """Frees `name`'s slot; its parameters stay until another task is loaded there."""
        self.slot(name)  # an unknown name raises ConfigError, listing the loaded ones
        del self._tasks[name]

    def tokenize(self, name: str, examples: Sequence[glue_data.Example]) -> input_pipeline.TokenizedDataset:
        """`examples` tokenized as `name`'s task was trained: its columns and its max_seq_length."""
        slot = self.slot(name)
        return input_pipeline.tokenize(slot.task, examples, self.tokenizer, slot.max_seq_length)

    def mixed_logits(
        self, names: Sequence[str], input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """Logits [N, MAX_LABELS] of rows that each name their task, in order, in batches of the fixed sizes.

        Row i is scored by task names[i]; columns past that task's labels are meaningless.
        """
        slot_ids = np.array([self.slot(name).index for name in names], np.int32)
        outputs = np.zeros((len(names), MAX_LABELS), np.float32)
        largest = self.batch_sizes[-1]
        for start in range(0, len(names), largest):
            rows = np.arange(start, min(start + largest, len(names)))
            size = next(size for size in self.batch_sizes if size >= len(rows))
            # Padding rows repeat the first row: a real example, so no row is entirely masked.
            padded = np.concatenate([rows, np.full(size - len(rows), rows[0])])
            length = int(self.buckets[np.searchsorted(self.buckets, lengths[rows].max())])
            mask = (np.arange(length) < lengths[padded][:, None]).astype(np.int32)
            logits = self._logits_step(
                self.model, self._shared, self._slots, slot_ids[padded],
                input_ids[padded, :length], token_type_ids[padded, :length], mask,
            )
            outputs[rows] = np.asarray(logits)[: len(rows)]
        return outputs

    def logits(self, parts: Sequence[tuple[str, input_pipeline.TokenizedDataset]]) -> list[np.ndarray]:
        """Each (task name, dataset) part's logits [examples, task's labels], from batches mixing all parts.

        Rows are scored in order of length, whatever their task, so that each batch pads little.
        """
        width = max(dataset.max_seq_length for _, dataset in parts)

        def padded(array: np.ndarray) -> np.ndarray:
            return np.pad(array, ((0, 0), (0, width - array.shape[1])))

        names = [name for name, dataset in parts for _ in range(len(dataset))]
        input_ids = np.concatenate([padded(dataset.input_ids) for _, dataset in parts])
        token_type_ids = np.concatenate([padded(dataset.token_type_ids) for _, dataset in parts])
        lengths = np.concatenate([dataset.lengths for _, dataset in parts])
        order = np.argsort(lengths, kind="stable")
        logits = np.empty((len(names), MAX_LABELS), np.float32)
        logits[order] = self.mixed_logits([names[i] for i in order], input_ids[order], token_type_ids[order],
                                          lengths[order])
        ends = np.cumsum([len(dataset) for _, dataset in parts])
        return [
            part_logits[:, : self.slot(name).task.num_labels]
            for (name, _), part_logits in zip(parts, np.split(logits, ends[:-1]), strict=True)
        ]
