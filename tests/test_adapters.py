"""The bottleneck adapter, its config, and where it sits: checked against transformers' BertModel with
the adapter hooked in by hand where the paper puts it (on each sublayer's output projection, before
the residual add and LayerNorm)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from adapter_jax import errors, weights
from adapter_jax.adapters import Adapter, AdapterConfig
from adapter_jax.modeling import BertConfig, BertForSequenceClassification, BertModel

TINY = BertConfig(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=16,
)
IDS = np.array([[2, 7, 9, 11, 3, 0], [2, 5, 3, 8, 13, 3]], np.int32)
TYPES = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]], np.int32)
MASK = (IDS > 0).astype(np.int32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random transformers BertModel and the same weights loaded as our params."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY.to_dict())).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # no zero biases or unit LayerNorms to hide a mix-up
            parameter.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder)
    config, pretrained = weights.load_pretrained(folder)
    assert config == TINY
    return model, pretrained


def with_adapters(adapter: AdapterConfig, pretrained: dict, make) -> dict:
    """BertModel params: `pretrained` plus each adapter leaf set to make(path, shape)."""
    shapes = traverse_util.flatten_dict(weights.abstract_params(BertModel(TINY, adapter)))
    flat = traverse_util.flatten_dict(pretrained)
    flat.update({path: make(path, leaf.shape) for path, leaf in shapes.items() if "adapter" in path})
    return traverse_util.unflatten_dict(flat)


def far_from_identity(seed: int = 0):
    """Adapter weights large enough that an adapter in the wrong place changes the output visibly."""
    rng = np.random.default_rng(seed)
    return lambda path, shape: rng.normal(0.0, 0.3, shape).astype(np.float32)


def apply(adapter: AdapterConfig, params: dict) -> tuple[np.ndarray, np.ndarray]:
    sequence, pooled = BertModel(TINY, adapter).apply({"params": params}, IDS, TYPES, MASK)
    return np.asarray(sequence), np.asarray(pooled)


def test_config_validates_and_answers_active():
    config = AdapterConfig(size=8, sites=["output"], layers=[1, 3])
    assert config.sites == ("output",) and config.layers == (1, 3)
    assert config.active(1, "output") and config.active(3, "output")
    assert not config.active(1, "attention") and not config.active(0, "output")
    assert AdapterConfig().active(11, "attention")
    assert not AdapterConfig(size=0).active(0, "output")
    with pytest.raises(errors.ConfigError, match="ffn"):
        AdapterConfig(sites=("attention", "ffn"))
    with pytest.raises(errors.ConfigError, match="ffn"):
        AdapterConfig().active(0, "ffn")
    with pytest.raises(errors.ConfigError, match="size"):
        AdapterConfig(size=-1)


def test_adapter_is_exact_gelu_bottleneck_with_residual():
    x = jax.random.normal(jax.random.key(0), (3, 5, 16))
    adapter = Adapter(size=4, init_std=1.0)  # large weights, so the GELU variant matters
    params = adapter.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda leaf: leaf + 0.1, params)  # nonzero biases too
    down, up = (
        (torch.tensor(np.asarray(params[name]["kernel"])), torch.tensor(np.asarray(params[name]["bias"])))
        for name in ("down", "up")
    )
    xt = torch.tensor(np.asarray(x))
    expected = xt + torch.nn.functional.gelu(xt @ down[0] + down[1]) @ up[0] + up[1]
    np.testing.assert_allclose(adapter.apply({"params": params}, x), expected.numpy(), atol=1e-5)


def test_adapter_init_is_truncated_normal_near_identity():
    x = jax.random.normal(jax.random.key(0), (4, 256))
    adapter = Adapter(size=64, init_std=1e-2)
    params = adapter.init(jax.random.key(1), x)["params"]
    for name, shape in (("down", (256, 64)), ("up", (64, 256))):
        kernel = np.asarray(params[name]["kernel"])
        assert kernel.shape == shape
        assert np.abs(kernel).max() <= 2e-2  # truncated at two standard deviations
        assert 0.7e-2 < kernel.std() < 1e-2  # truncation shrinks the std to ~0.88 of init_std
        assert not np.any(params[name]["bias"])
    delta = np.abs(np.asarray(adapter.apply({"params": params}, x) - x))
    assert 0 < delta.max() < 5e-2  # a few percent of the unit-scale input


def test_zero_up_projection_gives_exactly_the_base_model(reference):
    _, pretrained = reference
    adapter = AdapterConfig(size=4)
    random = far_from_identity()
    params = with_adapters(
        adapter, pretrained, lambda path, shape: np.zeros(shape, np.float32) if "up" in path else random(path, shape)
    )
    base_sequence, base_pooled = apply(AdapterConfig(size=0), pretrained)
    sequence, pooled = apply(adapter, params)
    np.testing.assert_array_equal(sequence, base_sequence)
    np.testing.assert_array_equal(pooled, base_pooled)


def test_default_init_is_near_identity(reference):
    _, pretrained = reference
    adapter = AdapterConfig(size=4)
    model = BertForSequenceClassification(TINY, adapter, num_labels=2)
    params = weights.init_params(model, pretrained, jax.random.key(0))["bert"]
    base_sequence, _ = apply(AdapterConfig(size=0), pretrained)
    diff = np.abs(apply(adapter, params)[0] - base_sequence).max()
    assert 0 < diff < 1e-2


@pytest.mark.parametrize(
    "adapter",
    [
        AdapterConfig(size=3),
        AdapterConfig(size=3, sites=("attention",)),
        AdapterConfig(size=3, sites=("output",)),
        AdapterConfig(size=3, layers=(1,)),
    ],
    ids=["both_sites", "attention_only", "output_only", "layer_1_only"],
)
def test_placement_matches_transformers_with_adapters_hooked_in(reference, adapter):
    torch_model, pretrained = reference
    params = with_adapters(adapter, pretrained, far_from_identity())
    hooks = []
    for i, layer in enumerate(torch_model.encoder.layer):
        for site, dense in (("attention", layer.attention.output.dense), ("output", layer.output.dense)):
            if not adapter.active(i, site):
                continue
            layer_params = params["encoder"][f"layer_{i}"]
            block = layer_params["attention"]["output"] if site == "attention" else layer_params["output"]
            down, up = (
                {key: torch.tensor(np.asarray(value)) for key, value in block["adapter"][name].items()}
                for name in ("down", "up")
            )

            # The paper's position: on the projection's output, ahead of dropout (identity in eval)
            # and of BertSelfOutput/BertOutput's LayerNorm(hidden + residual).
            def hook(module, inputs, out, down=down, up=up):
                hidden = torch.nn.functional.gelu(out @ down["kernel"] + down["bias"])
                return out + hidden @ up["kernel"] + up["bias"]

            hooks.append(dense.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = torch_model(
                input_ids=torch.from_numpy(IDS).long(),
                token_type_ids=torch.from_numpy(TYPES).long(),
                attention_mask=torch.from_numpy(MASK).long(),
            )
    finally:
        for handle in hooks:
            handle.remove()
    sequence, pooled = apply(adapter, params)
    tokens = MASK.astype(bool)
    np.testing.assert_allclose(sequence[tokens], out.last_hidden_state.numpy()[tokens], atol=1e-5)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5)
    # And the adapters matter: without them the output is far off.
    base_sequence, _ = apply(AdapterConfig(size=0), pretrained)
    assert np.abs(base_sequence - sequence).max() > 0.1


@pytest.mark.parametrize(
    "adapter, expected",
    [
        (AdapterConfig(size=4), {(0, "attention"), (0, "output"), (1, "attention"), (1, "output")}),
        (AdapterConfig(size=4, sites=("output",)), {(0, "output"), (1, "output")}),
        (AdapterConfig(size=4, layers=(0,)), {(0, "attention"), (0, "output")}),
        (AdapterConfig(size=4, sites=("attention",), layers=(1,)), {(1, "attention")}),
        (AdapterConfig(size=0), set()),
    ],
)
def test_ablations_create_adapters_only_where_asked(adapter, expected):
    shapes = weights.abstract_params(BertModel(TINY, adapter))
    found = set()
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if "adapter" in path:
            layer = int(path[1].removeprefix("layer_"))
            found.add((layer, "attention" if path[2] == "attention" else "output"))
            assert leaf.shape in {(16, 4), (4,), (4, 16), (16,)}
    assert found == expected
