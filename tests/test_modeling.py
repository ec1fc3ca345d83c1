"""BERT in linen against transformers' PyTorch BertModel on the real MiniLM checkpoint, packed rows against
one example per row, and BertConfig."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapter_jax import (
    errors,
    glue_data,
    input_pipeline,
    modeling,
    steps,
    tasks,
    weights,
)
from adapter_jax.adapters import AdapterConfig
from adapter_jax.modeling import BertConfig, BertForSequenceClassification, BertModel

# Pairs of different lengths, so the batch has padding in every row but the longest.
PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ("Adapters add a few parameters per task.", "Fine-tuning copies the whole network for every task, which is costly."),
    ("Hi.", "Bye."),
    ("Is it raining?", "The forecast said sunshine all week long, but the clouds have other ideas today."),
]

TINY = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    config, params = weights.load_pretrained(minilm_dir)
    return config, params


@pytest.fixture(scope="module")
def batch(minilm_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    encoded = tokenizer(
        [a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="np"
    )
    assert len(set(encoded["attention_mask"].sum(axis=1))) == len(PAIRS), "want distinct lengths"
    return {key: encoded[key].astype(np.int32) for key in ("input_ids", "token_type_ids", "attention_mask")}


@pytest.fixture(scope="module")
def torch_outputs(minilm_dir, batch):
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        out = model(**{key: torch.from_numpy(value).long() for key, value in batch.items()})
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def apply_bert(config, params, batch, dtype=jnp.float32):
    model = BertModel(config, dtype=dtype)
    return jax.jit(model.apply)(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    )


@pytest.mark.slow  # the real MiniLM
def test_matches_transformers_float32(minilm, batch, torch_outputs):
    config, params = minilm
    sequence, pooled = apply_bert(config, params, batch)
    torch_sequence, torch_pooled = torch_outputs
    tokens = batch["attention_mask"].astype(bool)
    sequence_diff = np.abs(np.asarray(sequence)[tokens] - torch_sequence[tokens]).max()
    pooled_diff = np.abs(np.asarray(pooled) - torch_pooled).max()
    print(f"max abs diff vs transformers: sequence {sequence_diff:.2e}, pooled {pooled_diff:.2e}")
    assert sequence.dtype == jnp.float32 and sequence.shape == torch_sequence.shape
    assert sequence_diff <= 1e-4
    assert pooled_diff <= 1e-4


@pytest.mark.slow  # the real MiniLM
def test_bfloat16_runs_close_to_float32(minilm, batch, torch_outputs):
    config, params = minilm
    sequence, pooled = apply_bert(config, params, batch, dtype=jnp.bfloat16)
    assert sequence.dtype == jnp.bfloat16
    torch_sequence, torch_pooled = torch_outputs
    tokens = batch["attention_mask"].astype(bool)
    ours = np.asarray(sequence, np.float32)[tokens]
    # Per-token cosine similarity: bfloat16 has ~3 significant digits, so elementwise checks are loose.
    cosine = np.sum(ours * torch_sequence[tokens], -1) / (
        np.linalg.norm(ours, axis=-1) * np.linalg.norm(torch_sequence[tokens], axis=-1)
    )
    assert cosine.min() > 0.99
    assert np.abs(np.asarray(pooled, np.float32) - torch_pooled).max() < 0.1


def test_classifier_logits_are_float32_and_dropout_uses_its_rng():
    model = BertForSequenceClassification(TINY, num_labels=3, dtype=jnp.bfloat16)
    ids = jnp.array([[2, 5, 7, 0], [3, 4, 0, 0]])
    args = (ids, jnp.zeros_like(ids), (ids > 0).astype(jnp.int32))
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    logits = apply(variables, *args)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    train_a, train_b = (
        apply(variables, *args, deterministic=False, rngs={"dropout": jax.random.key(seed)})
        for seed in (1, 2)
    )
    assert not np.allclose(train_a, train_b), "dropout must depend on the 'dropout' rng"
    np.testing.assert_array_equal(logits, apply(variables, *args))


@pytest.mark.slow  # the real MiniLM
def test_padding_does_not_change_token_outputs(minilm, batch):
    config, params = minilm
    sequence, _ = apply_bert(config, params, batch)
    row = int(np.argmin(batch["attention_mask"].sum(1)))  # the shortest pair, most padding
    length = int(batch["attention_mask"][row].sum())
    alone = {key: value[row : row + 1, :length] for key, value in batch.items()}
    sequence_alone, _ = apply_bert(config, params, alone)
    np.testing.assert_allclose(sequence[row, :length], sequence_alone[0], atol=1e-5)


@pytest.mark.slow  # the real MiniLM
def test_packed_rows_give_each_example_its_unpacked_outputs(minilm_dir, minilm):
    """Pairs of mixed lengths, several to a row: each example's token states, pooled output and logits
    are those it gets alone in its row (float32, no dropout)."""
    config, pretrained = minilm
    rng = np.random.default_rng(0)
    words = " ".join(text for pair in PAIRS for text in pair).split()
    examples = [
        glue_data.Example(i, " ".join(rng.choice(words, rng.integers(1, 30))),
                          " ".join(rng.choice(words, rng.integers(1, 20))), 0)
        for i in range(12)
    ]
    data = input_pipeline.tokenize(
        tasks.get_task("rte"), examples, input_pipeline.load_tokenizer(minilm_dir), max_seq_length=64
    )

    def one_batch(packing):
        layout = input_pipeline.Layout(global_batch_size=12, eval_batch_size=12, num_devices=1, max_seq_length=64,
                                       buckets=(64,), packing=packing, process_index=0, process_count=1)
        (batch,) = input_pipeline.eval_batches(data, layout)
        return {key: value[0] for key, value in batch.items()}  # the one device's shard

    unpacked, packed = one_batch(False), one_batch(True)
    assert packed["input_ids"].shape[0] < 12 and len(set(data.lengths.tolist())) > 6

    def outputs(model, params, batch):
        return jax.device_get(jax.jit(model.apply)({"params": params}, **steps.model_inputs(batch)))

    (sequence, pooled), (packed_sequence, packed_pooled) = (
        outputs(BertModel(config), pretrained, batch) for batch in (unpacked, packed)
    )
    token_diff = 0.0
    for example in range(12):
        length = data.lengths[example]
        row, start = divmod(int(packed["cls_index"][example]), 64)
        token_diff = max(token_diff, np.abs(packed_sequence[row, start : start + length] - sequence[example, :length]).max())
    classifier = BertForSequenceClassification(config, num_labels=3)
    params = weights.init_params(classifier, pretrained, jax.random.key(0))
    logits, packed_logits = (outputs(classifier, params, batch) for batch in (unpacked, packed))
    pooled_diff, logits_diff = np.abs(packed_pooled - pooled).max(), np.abs(packed_logits - logits).max()
    print(f"packed vs unpacked max abs diff: tokens {token_diff:.2e}, pooled {pooled_diff:.2e}, logits {logits_diff:.2e}")
    assert packed_logits.shape == logits.shape == (12, 3)
    assert max(token_diff, pooled_diff, logits_diff) <= 1e-5


def test_packed_rows_need_positions_and_first_tokens_both():
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="both position_ids and cls_index"):
        jax.eval_shape(BertModel(TINY).init, jax.random.key(0), ids, ids, ids, cls_index=jnp.zeros(2, jnp.int32))


def test_sequences_longer_than_the_position_table_are_refused():
    ids = jnp.ones((1, TINY.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(errors.ConfigError, match="max_position_embeddings"):
        jax.eval_shape(BertModel(TINY).init, jax.random.key(0), ids, ids, ids)


def test_config_from_dict_ignores_other_hf_keys_and_round_trips(minilm_dir):
    d = json.loads((minilm_dir / "config.json").read_text())
    config = weights.bert_config_from_dict(d)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (384, 6, 1536)
    assert weights.bert_config_from_dict(config.to_dict()) == config


def test_presets_have_bert_shapes():
    base, large = BertConfig.base(), BertConfig.large()
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size) == (
        768, 12, 12, 3072
    )
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == (
        1024, 24, 16, 4096
    )


@pytest.mark.parametrize(
    "key, value", [("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key")]
)
def test_config_rejects_unsupported_architecture(key, value):
    with pytest.raises(errors.WeightsError, match=key):
        weights.bert_config_from_dict({"hidden_size": 64, key: value})


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(errors.WeightsError, match=str(path)):
        weights.read_bert_config(path)
    path.write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(errors.WeightsError, match=f"{path}.*hidden_act"):
        weights.read_bert_config(path)
    with pytest.raises(errors.WeightsError, match="missing.json"):
        weights.read_bert_config(tmp_path / "missing.json")
    for not_an_object in ("[1, 2]", "null", '"bert"'):
        path.write_text(not_an_object)
        with pytest.raises(errors.WeightsError, match=f"{re.escape(str(path))} is not a JSON object"):
            weights.read_bert_config(path)


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_size": "big"},
        {"hidden_size": None},
        {"num_hidden_layers": [2]},
        {"num_attention_heads": 0},
        {"hidden_size": 9},  # not a multiple of the 2 heads
        {"intermediate_size": 64.5},
        {"vocab_size": True},
        {"hidden_dropout_prob": "0.1"},
        {"attention_probs_dropout_prob": 1.5},
        {"layer_norm_eps": float("nan")},
        {"hidden_size": None, "type_vocab_size": -1},
    ],
    ids=repr,
)
def test_malformed_config_values_name_the_file_and_key(tmp_path, change):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY.to_dict(), **change}))
    with pytest.raises(errors.WeightsError, match=re.escape(str(path))) as info:
        weights.read_bert_config(path)
    for key in change:
        assert key in str(info.value)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"])
def test_config_without_a_shape_key_names_the_file_and_key(tmp_path, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in TINY.to_dict().items() if k != key}))
    with pytest.raises(errors.WeightsError, match=f"{re.escape(str(path))}.*{key}"):
        weights.read_bert_config(path)


def test_config_may_leave_out_what_hf_defaults(tmp_path):
    path = tmp_path / "config.json"
    optional = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range")
    path.write_text(json.dumps({k: v for k, v in TINY.to_dict().items() if k not in optional}))
    assert weights.read_bert_config(path) == TINY


def test_params_tree_has_hf_module_names():
    shapes = weights.abstract_params(BertForSequenceClassification(TINY, AdapterConfig(size=4), num_labels=2))
    paths = {"/".join(path) for path in traverse_util.flatten_dict(shapes)}
    layer = "bert/encoder/layer_0"
    assert paths == {
        *(f"bert/embeddings/{name}_embeddings/embedding" for name in ("word", "position", "token_type")),
        "bert/embeddings/LayerNorm/scale",
        "bert/embeddings/LayerNorm/bias",
        *(f"{layer}/attention/self/{name}/{leaf}" for name in ("query", "key", "value") for leaf in ("kernel", "bias")),
        *(
            f"{layer}/{block}/{leaf}"
            for block in ("attention/output", "output")
            for leaf in (
                "dense/kernel", "dense/bias", "LayerNorm/scale", "LayerNorm/bias",
                "adapter/down/kernel", "adapter/down/bias", "adapter/up/kernel", "adapter/up/bias",
            )
        ),
        f"{layer}/intermediate/dense/kernel",
        f"{layer}/intermediate/dense/bias",
        "bert/pooler/dense/kernel",
        "bert/pooler/dense/bias",
        "classifier/kernel",
        "classifier/bias",
    }


def test_dropout_keeps_the_expected_fraction_and_rescales():
    x = jnp.ones((64, 128, 128))
    dropout = modeling.Dropout(0.1)
    assert dropout.apply({}, x, deterministic=True) is x
    y = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.9) < 0.002  # 1M draws: the standard error is 0.0003
    # The scale is 1 / the keep probability a 16-bit threshold gives, round(0.1 * 65536) = 6554 of 65536
    # values dropped: 1 / 0.9 to within 2^-16.
    np.testing.assert_allclose(np.asarray(y)[kept], 65536 / (65536 - 6554), rtol=1e-6)
    assert 65536 / (65536 - 6554) == pytest.approx(1 / 0.9, rel=2**-16)
    other = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.array_equal(kept, np.asarray(other) != 0)


@pytest.mark.parametrize("rate", [0.1, 0.3, 1 - 1.5 * 2**-16, 1 - 2**-16])
def test_dropout_is_unbiased_at_the_keep_probability_it_draws(rate):
    """Kept units are scaled by exactly 1 / P(keep), whatever rate the 16-bit threshold rounds."""
    dropped = round(rate * 65536)
    x = jnp.ones((1024, 1024))
    y = np.asarray(modeling.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    assert y.any()
    np.testing.assert_allclose(y[y != 0], 65536 / (65536 - dropped), rtol=1e-6)


@pytest.mark.parametrize("rate", [1 - 2**-17, 1 - 2**-18, 1.0])
def test_dropout_rates_that_round_to_one_drop_everything(rate):
    """A threshold of 65536 does not fit 16 bits; it must not wrap to 0 and keep every unit."""
    x = jnp.ones((256, 256))
    y = modeling.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert y.dtype == x.dtype
    assert not np.asarray(y).any()
