"""What trains in each mode, the split it makes, and the optimizer's weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from adapter_jax import errors, optim, trainable, weights
from adapter_jax.adapters import AdapterConfig
from adapter_jax.modeling import BertConfig, BertForSequenceClassification, BertModel

TINY = BertConfig(
    vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=16,
)


@pytest.fixture(scope="module")
def shapes():
    return weights.abstract_params(BertForSequenceClassification(TINY, AdapterConfig(size=4), num_labels=2))


def _trained_paths(shapes, **kwargs) -> set[tuple[str, ...]]:
    mask = traverse_util.flatten_dict(trainable.trainable_mask(shapes, num_layers=3, **kwargs))
    return {path for path, trains in mask.items() if trains}


def _paths(shapes, keep) -> set[tuple[str, ...]]:
    return {path for path in traverse_util.flatten_dict(shapes) if keep(path)}


def _head(path):
    return path[0] == "classifier"


def _layer_norm(path):
    return "LayerNorm" in path


def _adapter(path):
    return "adapter" in path


def _pooler(path):
    return "pooler" in path


def test_each_mode_trains_what_the_paper_says(shapes):
    assert _trained_paths(shapes, mode="adapters") == _paths(shapes, lambda p: _head(p) or _layer_norm(p) or _adapter(p))
    assert _trained_paths(shapes, mode="layernorm") == _paths(shapes, lambda p: _head(p) or _layer_norm(p))
    assert _trained_paths(shapes, mode="full") == _paths(shapes, lambda p: True)
    top_2 = _paths(shapes, lambda p: _head(p) or _pooler(p) or "layer_1" in p or "layer_2" in p)
    assert _trained_paths(shapes, mode="top_k", top_k=2) == top_2
    # Every LayerNorm of the three layers and the embeddings, both adapters of each layer: nothing missed.
    assert len(_paths(shapes, _layer_norm)) == 2 * (2 * 3 + 1)
    assert len(_paths(shapes, _adapter)) == 3 * 2 * 4


def test_train_pooler_adds_the_pooler_and_only_it(shapes):
    with_pooler = _trained_paths(shapes, mode="adapters", train_pooler=True)
    assert with_pooler - _trained_paths(shapes, mode="adapters") == _paths(shapes, _pooler) != set()


def test_an_unknown_mode_names_the_key_and_the_choices(shapes):
    with pytest.raises(errors.ConfigError, match=r"mode: unknown mode 'adapter'.*'adapters', 'layernorm'"):
        trainable.trainable_mask(shapes, mode="adapter", num_layers=3)


def test_split_and_merge_are_inverse_and_disjoint(shapes):
    mask = trainable.trainable_mask(shapes, mode="adapters", num_layers=3)
    trained, frozen = trainable.split(shapes, mask)
    trained_paths = set(traverse_util.flatten_dict(trained))
    assert trained_paths == _trained_paths(shapes, mode="adapters")
    assert not trained_paths & set(traverse_util.flatten_dict(frozen))
    assert trainable.merge(trained, frozen) == shapes


def test_parameter_summary_counts_against_the_base_model(shapes):
    summary = trainable.parameter_summary(shapes, trainable.trainable_mask(shapes, mode="adapters", num_layers=3))
    assert summary["base_params"] == trainable.count(weights.abstract_params(BertModel(TINY)))
    assert summary["total_params"] == trainable.count(shapes)
    d, m = TINY.hidden_size, 4
    expected = 3 * 2 * (2 * m * d + d + m) + (2 * 3 + 1) * 2 * d + d * 2 + 2
    assert summary["trainable_params"] == expected
    assert summary["trainable_fraction"] == expected / summary["base_params"]


def test_weight_decay_skips_layernorms_and_biases():
    """With zero gradients AdamW changes only what it decays: kernels shrink, the rest stays."""
    params = {
        "bert": {"encoder": {"layer_0": {"output": {
            "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "LayerNorm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        }}}},
        "classifier": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)},
    }
    tx = optim.create_optimizer(learning_rate=0.1, total_steps=10, warmup_fraction=0.0, weight_decay=0.5)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = traverse_util.flatten_dict(optax.apply_updates(params, updates))
    changed = {"/".join(path) for path, leaf in new.items() if not np.allclose(leaf, 1.0)}
    assert changed == {"bert/encoder/layer_0/output/dense/kernel", "classifier/kernel"}
