"""bfloat16 training: frozen weights stored in bfloat16 on the devices, trainable weights and Adam's moments
float32, and the numbers it gives against float32's (the step's HLO, MiniLM's logits, a tiny run's losses)."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_jax import (
    benchmarking,
    experiment,
    input_pipeline,
    steps,
    trainable,
    training_setup,
)
from adapter_jax.adapters import AdapterConfig
from adapter_jax.evaluation import Evaluator
from adapter_jax.modeling import BertConfig, BertForSequenceClassification

# Dimensions chosen so that no activation of the step below has a frozen weight's shape: per-device batch 5 x
# 8 tokens (40 rows of 32), vocabulary 97, 44 positions, 3 token types (2 is the label count), intermediate 48.
TINY = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  max_position_embeddings=44, type_vocab_size=3)
PER_DEVICE_BATCH, LENGTH = 5, 8


@functools.cache  # each program compiled once for every test here
def _tiny_step(compute_dtype: str, frozen_dtype: str) -> benchmarking.FixedShapeStep:
    """The adapters step of the tiny model computing in `compute_dtype`, its frozen weights stored in `frozen_dtype`."""
    return benchmarking.random_weights_step(
        TINY, dtype=compute_dtype, frozen_dtype=frozen_dtype, adapter_size=8,
        batch_size=PER_DEVICE_BATCH * jax.local_device_count(), seq_length=LENGTH,
    )


def _float32_copies(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """The instructions of `hlo` whose output is a float32 array of one of `shapes` (with or without pmap's
    leading device axis of 1)."""
    shapes = shapes | {(1, *shape) for shape in shapes}
    found = []
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = f32\[([\d,]*)\]", line)
        if match and tuple(int(d) for d in match.group(1).split(",") if d) in shapes:
            found.append(line.strip())
    return found


def _entry_parameter_types(hlo: str) -> list[str]:
    """'bf16[32,48]'-style types of the entry computation's parameters."""
    entry = hlo[hlo.index("\nENTRY "):]
    return re.findall(r"= (\w+\[[\d,]*\])(?:\{[^}]*\})? parameter\(", entry)


def test_bfloat16_step_takes_frozen_weights_in_bfloat16_and_never_makes_float32_copies():
    step = _tiny_step("bfloat16", "bfloat16")
    parameters = _entry_parameter_types(step.compiled.as_text())
    frozen_shapes = [leaf.shape[1:] for leaf in jax.tree.leaves(step.p_frozen)]  # less pmap's device axis
    for shape in frozen_shapes:  # pmap's program takes one device's slice: a leading axis of 1
        assert f"bf16[1,{','.join(map(str, shape))}]" in parameters
    weight_shapes = {tuple(shape) for shape in frozen_shapes if len(shape) == 2}
    # The program JAX hands XLA. (XLA:CPU's compiled program does convert each bfloat16 kernel to float32 for its
    # matmul library, for want of bfloat16 matmuls on this CPU; GPUs and TPUs multiply bfloat16 natively.)
    assert _float32_copies(step.lowered.as_text(dialect="hlo"), weight_shapes) == []

    # The check can fail: frozen weights passed in float32 (and cast to bfloat16 at every use) are found.
    old_hlo = _tiny_step("bfloat16", "float32").lowered.as_text(dialect="hlo")
    assert len(_float32_copies(old_hlo, weight_shapes)) >= len(weight_shapes)

    new_state, metrics = step.compiled(step.p_state, step.p_frozen, step.batches[0])
    assert bool(metrics["finite"].all())
    float_leaves = [x for x in jax.tree.leaves((new_state.params, new_state.opt_state))
                    if jnp.issubdtype(x.dtype, jnp.floating)]
    assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
    mu = new_state.opt_state[1][0].mu  # Adam's first moment, shaped like the trainable parameters
    assert jax.tree.structure(mu) == jax.tree.structure(new_state.params)


def test_frozen_layernorms_stay_float32_and_the_host_copy_is_untouched():
    params = BertForSequenceClassification(TINY, AdapterConfig(size=8)).init(
        jax.random.PRNGKey(0), *(jnp.ones((1, LENGTH), jnp.int32),) * 3)["params"]
    _, frozen = trainable.split(params, trainable.trainable_mask(params, mode="top_k", num_layers=2, top_k=1))
    on_devices = steps.unreplicate(steps.replicate_frozen(frozen, "bfloat16"))
    layer_norm = on_devices["bert"]["encoder"]["layer_0"]["output"]["LayerNorm"]["scale"]
    kernel = on_devices["bert"]["encoder"]["layer_0"]["output"]["dense"]["kernel"]
    assert layer_norm.dtype == np.float32 and kernel.dtype == jnp.bfloat16
    assert frozen["bert"]["encoder"]["layer_0"]["output"]["dense"]["kernel"].dtype == np.float32


def test_compiled_bfloat16_step_needs_less_memory_than_float32():
    float32 = benchmarking.step_memory(_tiny_step("float32", "float32").compiled)
    bfloat16 = benchmarking.step_memory(_tiny_step("bfloat16", "bfloat16").compiled)
    print(f"float32 {float32}, bfloat16 {bfloat16}")
    assert bfloat16["argument_bytes"] < float32["argument_bytes"]
    assert bfloat16["peak_bytes"] < float32["peak_bytes"]


def _losses(config, dtype: str, steps_count: int) -> np.ndarray:
    config = config.copy_and_resolve_references()
    config.dtype = dtype
    setup = training_setup.build(config)
    p_state, losses = steps.replicate(setup.initial_state), []
    for batch in itertools.islice(setup.train_iter, steps_count):
        p_state, metrics = setup.p_train_step(p_state, setup.p_frozen, batch)
        losses.append(float(metrics["loss"][0]))
    return np.array(losses)


def test_bfloat16_training_follows_float32_loss_curve(tiny_config):
    # 16 steps (two epochs of the toy RTE), with dropout: both runs draw the same masks.
    float32 = _losses(tiny_config, "float32", 16)
    bfloat16 = _losses(tiny_config, "bfloat16", 16)
    print("float32 ", np.round(float32, 4), "\nbfloat16", np.round(bfloat16, 4))
    # Measured: at most 3e-4 apart (losses ~0.69) on this CPU.
    assert np.abs(bfloat16 - float32).max() <= 0.01
    assert np.ptp(float32) > 0.03  # the parameters move, so the curves compared are not flat


@pytest.mark.slow  # the real MiniLM
def test_bfloat16_minilm_logits_stay_close_to_float32(minilm_dir, glue_dir):
    from configs import glue

    logits = {}
    for dtype in ("float32", "bfloat16"):
        config = glue.get_config("rte")
        config.update(model=str(minilm_dir), glue_dir=str(glue_dir), dtype=dtype, eval_batch_size=32)
        built = experiment.build(config)
        dev = experiment.load_dataset(config, built.task, "dev", input_pipeline.load_tokenizer(
            built.model_dir))
        logits[dtype] = Evaluator(built, config).logits(
            steps.replicate(built.trainable_params), steps.replicate_frozen(built.frozen_params, dtype), dev)
    difference = np.abs(logits["bfloat16"] - logits["float32"])
    scale = np.abs(logits["float32"]).max()
    print(f"RTE dev, {len(difference)} examples: max |logit| {scale:.3f}, max abs difference {difference.max():.4f}")
    assert difference.max() <= 0.05 * scale
