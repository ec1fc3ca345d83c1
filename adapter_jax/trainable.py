"""Which parameters train: path patterns per mode, the mask built from them, and the split it makes.

A parameter's path is its keys joined by "/", e.g. "bert/encoder/layer_3/output/adapter/down/kernel".
Each mode is a short list of regular expressions; a parameter trains when its path fully matches one
of them (the way big_vision and scenic write frozen-parameter rules). Everything else reads the one
`trainable_mask` built here: the training step and the optimizer see only the trainable subtree,
checkpoints and the adapter export hold it, and parameter accounting counts it.
"""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import traverse_util

from adapter_jax.errors import ConfigError

HEAD = r"classifier/.*"
LAYER_NORMS = r".*/LayerNorm/.*"
ADAPTERS = r".*/adapter/.*"
POOLER = r"bert/pooler/.*"
TOP_LAYERS = r"bert/encoder/layer_({top_layers})/.*"  # filled in with the top k layer indices

TRAINABLE_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "adapters": (HEAD, LAYER_NORMS, ADAPTERS),  # the paper
    "layernorm": (HEAD, LAYER_NORMS),  # the paper's LayerNorm-only baseline
    "top_k": (HEAD, POOLER, TOP_LAYERS),  # the paper's "fine-tune the top k layers" baseline
    "full": (r".*",),
}
MODES = tuple(TRAINABLE_PATTERNS)
# Parameters the base model does not have (a task adds them, whatever its mode); the paper's "trained
# parameters per task" are a fraction of the others, the base model's.
NOT_IN_BASE_PATTERNS = (HEAD, ADAPTERS)
# BERT's AdamW does not decay LayerNorm parameters or biases.
NOT_DECAYED_PATTERNS = (LAYER_NORMS, r".*/bias")

Params = Mapping[str, Any]


def trainable_patterns(
    mode: str, *, num_layers: int, top_k: int = 0, train_pooler: bool = False, houlsby_layernorms: bool = True
) -> tuple[str, ...]:
    """The patterns of the parameters that train in `mode`; `train_pooler` adds the pooler to any mode, and
    `houlsby_layernorms=False` keeps the LayerNorms of adapters mode frozen."""
    if mode not in TRAINABLE_PATTERNS:
        raise ConfigError(f"mode: unknown mode {mode!r}; expected one of {MODES}")
    top_layers = "|".join(str(layer) for layer in range(max(num_layers - top_k, 0), num_layers))
    patterns = tuple(pattern.format(top_layers=top_layers) for pattern in TRAINABLE_PATTERNS[mode])
    if mode == "adapters" and not houlsby_layernorms:
        patterns = tuple(pattern for pattern in patterns if pattern != LAYER_NORMS)
    return patterns + ((POOLER,) if train_pooler and POOLER not in patterns else ())


def path_name(path: Sequence[Any]) -> str:
    """('bert', 'pooler', ...) or a jax key path -> 'bert/pooler/...'."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def matches(params: Params, patterns: Sequence[str]) -> dict:
    """A tree shaped like `params` whose leaves say whether the leaf's path fully matches a pattern."""
    compiled = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(compiled.fullmatch(path_name(path))), params)


def trainable_mask(
    params: Params, *, mode: str, num_layers: int, top_k: int = 0, train_pooler: bool = False,
    houlsby_layernorms: bool = True,
) -> dict:
    """True for each parameter of `params` that trains in `mode` (see `trainable_patterns`)."""
    patterns = trainable_patterns(
        mode, num_layers=num_layers, top_k=top_k, train_pooler=train_pooler, houlsby_layernorms=houlsby_layernorms
    )
    return matches(params, patterns)


def split(params: Params, mask: Params) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts holding the leaves of `params` where `mask` is True, and the rest."""
    flat_mask = traverse_util.flatten_dict(mask)
    trainable, frozen = {}, {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        (trainable if flat_mask[path] else frozen)[path] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: Params, frozen: Params) -> dict:
    """The inverse of `split`: one nested dict with the leaves of both."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def count(params: Params) -> int:
    """Number of parameters in a tree of arrays or jax.ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def parameter_summary(params: Params, mask: Params) -> dict[str, Any]:
    """Parameter counts; the fraction is trained parameters per task over the base model's, as in the paper."""
    trained, _ = split(params, mask)
    _, base = split(params, matches(params, NOT_IN_BASE_PATTERNS))
    return {
        "total_params": count(params),
        "base_params": count(base),
        "trainable_params": count(trained),
        "trainable_fraction": count(trained) / count(base),
    }
