"""Which parameters train, and the optax chain that trains them.

One rule over parameter paths decides what trains (`is_trainable`); everything else
(the optimizer, the lean training step, the adapter export, parameter accounting)
reads the label pytree built from it.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import traverse_util

TRAINABLE = "trainable"
FROZEN = "frozen"
MODES = ("adapters", "full", "top_k", "layernorm")

Params = Mapping[str, Any]
Path = tuple[str, ...]


def is_trainable(
    path: Path, *, mode: str, num_layers: int, top_k: int = 0, train_pooler: bool = False
) -> bool:
    """Whether the parameter at `path` (e.g. ('bert', 'encoder', 'layer_3', ...)) trains in `mode`.

    adapters:  adapters + every LayerNorm + task head (the paper); pooler frozen unless train_pooler.
    full:      everything.
    top_k:     the top `top_k` encoder layers + pooler + task head (the paper's "top layers" baseline).
    layernorm: every LayerNorm + task head.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    is_head = path[0] == "classifier"
    is_layernorm = "LayerNorm" in path
    is_pooler = "pooler" in path
    if mode == "full":
        return True
    if mode == "adapters":
        return is_head or is_layernorm or "adapter" in path or (train_pooler and is_pooler)
    if mode == "layernorm":
        return is_head or is_layernorm or (train_pooler and is_pooler)
    # top_k
    layer = next((int(p.removeprefix("layer_")) for p in path if p.startswith("layer_")), None)
    return is_head or is_pooler or (layer is not None and layer >= num_layers - top_k)


def trainable_labels(
    params: Params, *, mode: str, num_layers: int, top_k: int = 0, train_pooler: bool = False
) -> dict:
    """A pytree shaped like `params` whose leaves are TRAINABLE or FROZEN."""
    flat = traverse_util.flatten_dict(params)
    labels = {
        path: TRAINABLE
        if is_trainable(path, mode=mode, num_layers=num_layers, top_k=top_k, train_pooler=train_pooler)
        else FROZEN
        for path in flat
    }
    return traverse_util.unflatten_dict(labels)


def partition(params: Params, labels: Params) -> tuple[dict, dict]:
    """Splits `params` into (trainable, frozen) nested dicts with disjoint leaves."""
    flat_labels = traverse_util.flatten_dict(labels)
    trainable, frozen = {}, {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        (trainable if flat_labels[path] == TRAINABLE else frozen)[path] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(*parts: Params) -> dict:
    """Inverse of `partition`: joins nested dicts with disjoint leaves into one."""
    flat = {}
    for part in parts:
        flat.update(traverse_util.flatten_dict(part))
    return traverse_util.unflatten_dict(flat)


def count_parameters(params: Params, labels: Params) -> tuple[int, int]:
    """(total, trainable) parameter counts; works on arrays or jax.ShapeDtypeStructs."""
    flat_labels = traverse_util.flatten_dict(labels)
    total = trainable = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        size = math.prod(leaf.shape)
        total += size
        trainable += size if flat_labels[path] == TRAINABLE else 0
    return total, trainable


def learning_rate_schedule(
    learning_rate: float, total_steps: int, warmup_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, then linear decay to zero (BERT's schedule)."""
    warmup_steps = int(total_steps * warmup_fraction)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
            optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1)),
        ],
        boundaries=[warmup_steps],
    )


def _decays(path: tuple, _) -> bool:
    """BERT's AdamW skips weight decay for LayerNorm parameters and biases."""
    names = [getattr(key, "key", str(key)) for key in path]
    return names[-1] != "bias" and "LayerNorm" not in names


def create_optimizer(
    labels: Params,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    adam_epsilon: float = 1e-6,
    max_grad_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW + global-norm clipping for TRAINABLE leaves; `set_to_zero` (no state) for FROZEN ones.

    The transform for the trainable group sees only trainable leaves, so the clipping norm is
    the norm of the trainable gradients alone.
    """
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_fraction)
    adamw = optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(
            schedule,
            b1=0.9,
            b2=0.999,
            eps=adam_epsilon,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params),
        ),
    )
    return optax.multi_transform({TRAINABLE: adamw, FROZEN: optax.set_to_zero()}, labels)

