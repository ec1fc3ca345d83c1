"""The training state and the pure, pmapped training and evaluation steps.

The state holds the trainable parameters only; the frozen weights are a separate argument of each
step, replicated once and never donated. The step differentiates the trainable parameters alone,
so XLA computes no weight gradients for frozen weights, and the cross-device mean (`lax.pmean`)
carries only trainable gradients.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adapter_jax import trainable
from adapter_jax.modeling import BertForSequenceClassification

AXIS = "devices"
# The parameters of the modules that compute in float32 whatever the computation dtype (modeling.py's LayerNorm
# and classifier): stored in bfloat16 they would lose precision their computation keeps, and they are small.
FLOAT32_COMPUTE_PARAMS = (trainable.LAYER_NORMS, trainable.HEAD)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable parameters; frozen ones are passed to the steps beside the state
    opt_state: optax.OptState
    rng: jax.Array  # dropout's stream


def initial_state(trainable_params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable_params,
        opt_state=tx.init(trainable_params),
        # The parameters were initialised from PRNGKey(seed) itself; dropout draws from another stream.
        rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
    )


def per_example_loss(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
    if is_regression:
        return jnp.square(logits[..., 0] - labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's inputs in `batch`, unpacked or packed (BertModel's position_ids and cls_index)."""
    packed = ("position_ids", "cls_index") if "cls_index" in batch else ()
    keys = ("input_ids", "token_type_ids", "segment_ids", *packed)
    return {key: batch[key] for key in keys}


def batch_loss(
    trainable_params: Any,
    frozen_params: Any,
    batch: Mapping[str, jax.Array],
    dropout_rng: jax.Array,
    *,
    model: BertForSequenceClassification,
    is_regression: bool,
) -> jax.Array:
    """The weighted mean loss over the examples of one device's shard, packed or not, with dropout."""
    logits = model.apply(
        {"params": trainable.merge(trainable_params, frozen_params)},
        **model_inputs(batch),
        deterministic=False,
        rngs={"dropout": dropout_rng},
    )
    losses = per_example_loss(logits, batch["label"], is_regression)
    return jnp.sum(losses * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)


def train_step(
    state: TrainState,
    frozen_params: Any,
    batch: Mapping[str, jax.Array],
    *,
    model: BertForSequenceClassification,
    tx: optax.GradientTransformation,
    is_regression: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one device's shard of the batch; call under pmap(axis_name=AXIS).

    A step whose loss or gradient is not finite leaves the parameters and Adam's moments unchanged
    and reports finite=False; the host loop decides whether to stop or go on. It still counts as a
    step of the optimizer, so the learning-rate schedule follows the loop's step and ends at zero.
    """
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
    loss, grads = jax.value_and_grad(batch_loss)(
        state.params, frozen_params, batch, dropout_rng, model=model, is_regression=is_regression
    )
    loss, grads = jax.lax.pmean((loss, grads), AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    step = state.step + 1
    new_state = state.replace(
        step=step,
        params=keep_if_finite(params, state.params),
        # Every optax step counter (the schedule's, Adam's bias correction) equals the loop's step.
        opt_state=optax.tree_utils.tree_set(keep_if_finite(opt_state, state.opt_state), count=step),
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def eval_step(
    trainable_params: Any, frozen_params: Any, batch: Mapping[str, jax.Array], *, model: BertForSequenceClassification
) -> jax.Array:
    """Logits for one device's shard of an evaluation batch, one per example."""
    return model.apply({"params": trainable.merge(trainable_params, frozen_params)}, **model_inputs(batch))


def pmapped_train_step(
    model: BertForSequenceClassification,
    tx: optax.GradientTransformation,
    is_regression: bool,
    devices: Sequence[jax.Device] | None = None,
):
    """`train_step` for this model and optimizer, pmapped over `devices` (all local ones by default).

    The state is donated (updated in place); the frozen parameters are not (every step reads them).
    """
    return jax.pmap(
        functools.partial(train_step, model=model, tx=tx, is_regression=is_regression),
        axis_name=AXIS,
        donate_argnums=(0,),
        devices=devices,
    )


def pmapped_eval_step(model: BertForSequenceClassification):
    return jax.pmap(functools.partial(eval_step, model=model), axis_name=AXIS)


def replicate(tree: Any) -> Any:
    """Copies `tree` to every local device laid out as pmap's own outputs are.

    flax's jax_utils.replicate lays arrays out on another mesh, which under JAX's shard_map-based
    pmap makes the second training step compile the whole program again.
    """
    if not jax.tree.leaves(tree):  # nothing frozen (full fine-tuning): nothing to copy, and pmap needs an array
        return tree
    count = jax.local_device_count()
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))), tree)
    return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def replicate_frozen(frozen_params: Any, dtype: str | jnp.dtype) -> Any:
    """The frozen parameters on every local device, each weight the model multiplies in `dtype` stored in `dtype`.

    They never change, so casting them once here halves the memory they take on the devices and the bytes each
    step reads (in bfloat16), where the step would otherwise read float32 and cast at every use. The host's
    copy, checkpoints and exports keep float32; so does the base fingerprint, taken from the pretrained weights.
    """
    keep_float32 = trainable.matches(frozen_params, FLOAT32_COMPUTE_PARAMS)
    stored = jax.tree.map(
        lambda x, keep: x if keep else np.asarray(x, jnp.dtype(dtype)), frozen_params, keep_float32
    )
    return replicate(stored)


def unreplicate(tree: Any) -> Any:
    """This process's first device's copy of a replicated tree, on the host.

    Read from that device's own shard: indexing (`x[0]`) would run a gather over every process's devices, a
    collective that hangs a pod where only process 0 unreplicates (to write the export).
    """
    return jax.tree.map(_first_local_copy, tree)


def _first_local_copy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
    return np.asarray(x)[0]
