"""What a training step costs: a step of the config compiled at one shape, the FLOPs of its matmuls read from
the compiled HLO, the padding and shapes of a run's batches, and the CPU it ran on. scripts/benchmark.py and
scripts/profile_step.py measure with these."""

import dataclasses
import itertools
import math
import os
import pathlib
import platform
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adapter_jax import optim, steps, trainable, training_setup
from adapter_jax.adapters import AdapterConfig
from adapter_jax.input_pipeline import Batch
from adapter_jax.modeling import BertConfig, BertForSequenceClassification

# The models scripts/benchmark.py times on an accelerator, with random weights (speed does not depend on them).
SHAPED_MODELS = {
    "MiniLM-L6-H384": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "BERT-base": BertConfig.base(),
    "BERT-large": BertConfig.large(),
}


@dataclasses.dataclass
class FixedShapeStep:
    """A training step compiled for one batch shape, with what it runs on."""

    compiled: jax.stages.Compiled  # (p_state, p_frozen, batch) -> (p_state, device metrics); donates p_state
    p_state: steps.TrainState
    p_frozen: Any
    batches: list[Batch]  # batches of the compiled shape
    parameter_summary: dict[str, Any]
    lowered: jax.stages.Lowered  # the program JAX hands XLA, before any backend's rewrites

    def matmul_flops(self) -> float:
        """FLOPs of one device's matmuls, counted in the lowered program: a GPU's compiled one calls its matmul
        libraries instead of `dot`s."""
        return matmul_flops(self.lowered.as_text(dialect="hlo"))


def fixed_shape_step(config: ml_collections.ConfigDict, num_batches: int) -> FixedShapeStep:
    """The training step of `config`, built as training builds it, compiled for one example per row at the full
    max_seq_length (every batch that shape), and `num_batches` real batches of the train split; the learning-rate
    schedule spans 1000 steps, so that the timed steps train at a warm-up rate."""
    config = config.copy_and_resolve_references()
    config.packing = False
    config.buckets = (config.max_seq_length,)
    config.num_train_steps = 1000
    setup = training_setup.build(config)
    batches = list(itertools.islice(setup.train_iter, num_batches))
    p_state = steps.replicate(setup.initial_state)
    lowered = setup.p_train_step.lower(p_state, setup.p_frozen, batches[0])
    return FixedShapeStep(lowered.compile(), p_state, setup.p_frozen, batches, setup.parameter_summary, lowered)


def random_weights_step(
    bert_config: BertConfig, *, dtype: str, batch_size: int, seq_length: int, adapter_size: int,
    mode: str = "adapters", frozen_dtype: str | None = None,
) -> FixedShapeStep:
    """The training step of a randomly initialised model shaped `bert_config`, built as training_setup builds a
    run's (trainable split, optimizer, frozen weights in `dtype` on the devices, or in `frozen_dtype` if given),
    compiled for one random batch of `batch_size` full-length examples split over the local devices."""
    devices = jax.local_device_count()
    model = BertForSequenceClassification(bert_config, AdapterConfig(size=adapter_size), dtype=jnp.dtype(dtype))
    ids = jnp.ones((1, seq_length), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, ids, ids)["params"]
    mask = trainable.trainable_mask(params, mode=mode, num_layers=bert_config.num_hidden_layers)
    trained, frozen = trainable.split(params, mask)
    tx = optim.create_optimizer(learning_rate=1e-4, total_steps=1000)
    p_state = steps.replicate(steps.initial_state(trained, tx, seed=0))
    p_frozen = steps.replicate_frozen(frozen, frozen_dtype or dtype)
    shape = (devices, batch_size // devices, seq_length)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, bert_config.vocab_size, shape, dtype=np.int32),
        "token_type_ids": np.zeros(shape, np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "label": rng.integers(0, 2, shape[:2], dtype=np.int32),
        "weight": np.ones(shape[:2], np.float32),
    }
    lowered = steps.pmapped_train_step(model, tx, is_regression=False).lower(p_state, p_frozen, batch)
    summary = trainable.parameter_summary(params, mask)
    return FixedShapeStep(lowered.compile(), p_state, p_frozen, [batch], summary, lowered)


def step_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's memory analysis of one device's compiled program, in bytes: its arguments, outputs, temporaries, and
    the peak of all three together, less the outputs written into donated arguments."""
    analysis = compiled.memory_analysis()
    argument, output = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
    temp, aliased = analysis.temp_size_in_bytes, analysis.alias_size_in_bytes
    return {"argument_bytes": argument, "output_bytes": output, "temp_bytes": temp,
            "peak_bytes": argument + output + temp - aliased}


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")


def hlo_computations(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, tuple[str, str]]]:
    """(computation -> its instruction lines, instruction -> (shape, line)) of an HLO module's text."""
    computations, instructions, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            current.append(line)
            instructions[match.group(1)] = (match.group(2), line)
    return computations, instructions


def _shape(text: str) -> list[int]:
    dims = re.search(r"\[([\d,]*)\]", text).group(1)
    return [int(d) for d in dims.split(",") if d]


def dot_flops(lines: list[str], instructions: dict[str, tuple[str, str]]) -> float:
    """FLOPs of the dots among `lines`: 2 x output elements x contracted length."""
    flops = 0.0
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match or match.group(3) != "dot":
            continue
        lhs_name = re.match(r"%?([\w.\-]+)", match.group(4)).group(1)
        lhs = _shape(instructions[lhs_name][0])
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        depth = math.prod(lhs[int(dim)] for dim in contracted.split(","))
        flops += 2.0 * math.prod(_shape(match.group(2))) * depth
    return flops


def matmul_flops(hlo_text: str) -> float:
    """FLOPs of every matmul in a compiled program's HLO text."""
    computations, instructions = hlo_computations(hlo_text)
    return sum(dot_flops(lines, instructions) for lines in computations.values())


def cpu_description() -> str:
    """The CPU model, logical cores and widest vector extension, as /proc/cpuinfo gives them."""
    info = pathlib.Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    model = fields.get("model name", platform.processor() or platform.machine())
    flag_set = set(fields.get("flags", "").split())
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flag_set), "no AVX2")
    return f"{model}, {os.cpu_count()} logical cores, {vectors}"


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
        token_slots += batch["segment_ids"].size
        real_tokens += _real_tokens(batch)
        shapes.add(tuple(sorted((key, value.shape) for key, value in batch.items())))
    return BatchStats(count, token_slots, real_tokens, frozenset(shapes))


def _real_tokens(batch: Batch) -> int:
    if "cls_index" in batch:  # packed: fillers take no room
        return int(np.count_nonzero(batch["segment_ids"]))
    return int(np.count_nonzero(batch["segment_ids"][batch["weight"] > 0]))
