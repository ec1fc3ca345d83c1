"""HF checkpoint import/export: tiny synthetic checkpoints written by transformers, plus the real MiniLM."""

import json
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

from adapter_jax import errors, weights
from adapter_jax.adapters import AdapterConfig
from adapter_jax.modeling import BertConfig, BertForSequenceClassification

TINY = BertConfig(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=16,
)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    """A tiny transformers BertModel's tensors (random everywhere, so mix-ups show), HF names."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY.to_dict()))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}


class NotATensor:
    """Unpickling this needs an arbitrary import, which torch.load(weights_only=True) refuses."""


def write_checkpoint(folder, tensors, config: BertConfig = TINY):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **config.to_dict()}))
    safetensors.numpy.save_file(dict(tensors), folder / "model.safetensors")
    return folder


def flat(params) -> dict:
    return traverse_util.flatten_dict(params)


def assert_same_params(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg="/".join(path))


def test_loads_transformers_checkpoint(tmp_path, state_dict):
    config, params = weights.load_pretrained(write_checkpoint(tmp_path, state_dict))
    assert config == TINY
    layer = params["encoder"]["layer_1"]
    # PyTorch Linear weights are [out, in]; Flax Dense kernels are [in, out].
    np.testing.assert_array_equal(
        layer["intermediate"]["dense"]["kernel"], state_dict["encoder.layer.1.intermediate.dense.weight"].T
    )
    np.testing.assert_array_equal(
        layer["attention"]["self"]["key"]["bias"], state_dict["encoder.layer.1.attention.self.key.bias"]
    )
    np.testing.assert_array_equal(
        layer["output"]["LayerNorm"]["scale"], state_dict["encoder.layer.1.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(
        params["embeddings"]["token_type_embeddings"]["embedding"], state_dict["embeddings.token_type_embeddings.weight"]
    )
    parameters = {name for name in state_dict if name != "embeddings.position_ids"}
    assert len(flat(params)) == len(parameters)
    assert all(leaf.dtype == np.float32 for leaf in flat(params).values())


def test_accepts_bert_prefix_old_layernorm_names_and_ignores_heads(tmp_path, state_dict):
    _, expected = weights.load_pretrained(write_checkpoint(tmp_path / "plain", state_dict))
    renamed = {
        "bert." + name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
        for name, value in state_dict.items()
    }
    renamed["bert.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    renamed["cls.predictions.bias"] = np.zeros(40, np.float32)
    renamed["cls.predictions.transform.dense.weight"] = np.zeros((16, 16), np.float32)
    _, params = weights.load_pretrained(write_checkpoint(tmp_path / "prefixed", renamed))
    assert_same_params(params, expected)


def test_pytorch_bin_loads_with_weights_only(tmp_path, state_dict):
    _, expected = weights.load_pretrained(write_checkpoint(tmp_path / "safetensors", state_dict))
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY.to_dict()))
    torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, folder / "pytorch_model.bin")
    _, params = weights.load_pretrained(folder)
    assert_same_params(params, expected)
    # A pickle that would run code when loaded is refused, not executed.
    torch.save({"payload": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(errors.WeightsError, match="pytorch_model.bin"):
        weights.load_pretrained(folder)


def test_all_mismatches_reported_in_one_error(tmp_path, state_dict):
    tensors = dict(state_dict)
    del tensors["encoder.layer.0.attention.self.value.weight"]
    tensors["encoder.layer.0.attention.self.extra.weight"] = np.zeros((16, 16), np.float32)
    tensors["encoder.layer.1.output.dense.weight"] = np.zeros((16, 31), np.float32)
    folder = write_checkpoint(tmp_path, tensors)
    with pytest.raises(errors.WeightsError) as info:
        weights.load_pretrained(folder)
    message = str(info.value)
    assert str(folder / "model.safetensors") in message
    assert "missing tensor encoder.layer.0.attention.self.value.weight" in message
    assert "unexpected tensor encoder.layer.0.attention.self.extra.weight" in message
    assert "encoder.layer.1.output.dense.weight has shape (16, 31), expected (16, 32)" in message


def test_missing_folder_config_or_weights_name_the_path(tmp_path, state_dict):
    with pytest.raises(errors.WeightsError, match=re.escape(str(tmp_path / "nowhere"))):
        weights.load_pretrained(tmp_path / "nowhere")
    folder = write_checkpoint(tmp_path / "no_config", state_dict)
    (folder / "config.json").unlink()
    with pytest.raises(errors.WeightsError, match=re.escape(f"config.json in {folder}")):
        weights.load_pretrained(folder)
    folder = write_checkpoint(tmp_path / "no_weights", state_dict)
    (folder / "model.safetensors").unlink()
    with pytest.raises(errors.WeightsError, match=re.escape(f"model.safetensors or pytorch_model.bin in {folder}")):
        weights.load_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, state_dict, damage):
    path = write_checkpoint(tmp_path, state_dict) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37" * 100)
    with pytest.raises(errors.WeightsError, match=re.escape(f"cannot read weights file {path}")):
        weights.load_pretrained(path.parent)


def test_resolve_model_dir(minilm_dir, tmp_path):
    assert weights.resolve_model_dir(None) == minilm_dir
    assert weights.resolve_model_dir("minilm") == minilm_dir
    assert weights.resolve_model_dir("all-MiniLM-L6-v2") == minilm_dir
    assert weights.resolve_model_dir(tmp_path) == tmp_path
    assert weights.resolve_model_dir(str(tmp_path)) == tmp_path


def test_unavailable_hub_name_says_to_pass_a_folder():
    # Offline this fails to connect; online the repository does not exist. Either way: one clear error.
    name = "adapter-jax-tests/no-such-bert"
    with pytest.raises(errors.WeightsError, match=f"(?s)'{name}'.*download.*local folder") as info:
        weights.resolve_model_dir(name)
    assert "failed" in str(info.value)


def test_init_params_takes_every_base_weight_and_keeps_fresh_adapters_and_head(tmp_path, state_dict):
    _, pretrained = weights.load_pretrained(write_checkpoint(tmp_path, state_dict))
    model = BertForSequenceClassification(TINY, AdapterConfig(size=4), num_labels=3)
    params = weights.init_params(model, pretrained, jax.random.key(0))
    assert params.keys() == {"bert", "classifier"}
    assert params["classifier"]["kernel"].shape == (16, 3)
    bert = flat(params["bert"])
    adapters = {path: leaf for path, leaf in bert.items() if "adapter" in path}
    assert len(adapters) == 2 * 2 * 4  # 2 layers x 2 sites x (down, up) x (kernel, bias)
    assert all(np.any(leaf) for path, leaf in adapters.items() if path[-1] == "kernel")
    base = traverse_util.unflatten_dict({path: leaf for path, leaf in bert.items() if "adapter" not in path})
    assert_same_params(base, pretrained)
    # Applying works as the training code will call it.
    ids = np.ones((2, 5), np.int32)
    assert model.apply({"params": params}, ids, ids, ids).shape == (2, 3)


def test_init_params_lists_what_does_not_fit(tmp_path, state_dict):
    _, pretrained = weights.load_pretrained(write_checkpoint(tmp_path, state_dict))
    pretrained = flat(pretrained)
    del pretrained["pooler", "dense", "bias"]
    pretrained["encoder", "layer_0", "intermediate", "dense", "kernel"] = np.zeros((16, 8), np.float32)
    model = BertForSequenceClassification(TINY, AdapterConfig(size=4), num_labels=2)
    with pytest.raises(errors.WeightsError) as info:
        weights.init_params(model, traverse_util.unflatten_dict(pretrained), jax.random.key(0))
    assert "missing pooler/dense/bias" in str(info.value)
    assert "encoder/layer_0/intermediate/dense/kernel has shape (16, 8), expected (16, 32)" in str(info.value)


@pytest.mark.slow  # the real MiniLM
def test_round_trip_minilm_is_identical(minilm_dir, tmp_path):
    config, params = weights.load_pretrained(minilm_dir)
    out = weights.export_pretrained(config, params, tmp_path / "export", tokenizer_dir=minilm_dir)
    again_config, again = weights.load_pretrained(out)
    assert again_config == config
    assert_same_params(again, params)
    assert (out / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "bert" and hf_config["hidden_act"] == "gelu"
    assert hf_config["architectures"] == ["BertModel"]


def test_export_is_read_by_transformers_and_leaves_adapters_out(tmp_path, state_dict):
    _, pretrained = weights.load_pretrained(write_checkpoint(tmp_path / "in", state_dict))
    model = BertForSequenceClassification(TINY, AdapterConfig(size=4), num_labels=2)
    params = weights.init_params(model, pretrained, jax.random.key(0))
    out = weights.export_pretrained(TINY, params["bert"], tmp_path / "out")
    assert not any("adapter" in name for name in safetensors.numpy.load_file(out / "model.safetensors"))
    exported = transformers.BertModel.from_pretrained(str(out)).state_dict()
    for name, value in state_dict.items():
        np.testing.assert_array_equal(exported[name].numpy(), value, err_msg=name)


def test_export_rejects_params_that_do_not_fit(tmp_path, state_dict):
    _, pretrained = weights.load_pretrained(write_checkpoint(tmp_path / "in", state_dict))
    with pytest.raises(errors.WeightsError, match="missing embeddings/word_embeddings/embedding"):
        weights.export_pretrained(TINY, {"bert": pretrained}, tmp_path / "out")
    with pytest.raises(errors.WeightsError, match=re.escape(str(tmp_path))):
        weights.export_pretrained(TINY, pretrained, tmp_path / "out", tokenizer_dir=tmp_path)
