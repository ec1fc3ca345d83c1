"""Parameter accounting: the model's counts against the paper's formula and BERT's published sizes."""

import pytest

from adapter_jax.modeling import BertConfig
from adapter_jax.weights import parameter_report
from scripts import count_params

# transformers' BertModel.num_parameters() for bert-base-uncased and bert-large-uncased (pooler included).
PUBLISHED = {"bert-base": 109_482_240, "bert-large": 335_141_888}
CONFIGS = {"bert-base": BertConfig.base(), "bert-large": BertConfig.large()}


def paper_trainable(config: BertConfig, m: int, k: int) -> int:
    """Adapters (2md + d + m each, two per layer) + LayerNorms (2 per layer + embeddings', 2d each) + head."""
    d, layers = config.hidden_size, config.num_hidden_layers
    return layers * 2 * (2 * m * d + d + m) + (2 * layers + 1) * 2 * d + d * k + k


@pytest.fixture(scope="module")
def reports():
    return count_params.main([])


def test_script_covers_both_models_and_three_sizes(reports):
    assert [(r["model"], r["adapter_size"]) for r in reports] == [
        (model, m) for model in ("bert-base", "bert-large") for m in (8, 64, 256)
    ]


def test_counts_match_the_paper_formula_and_published_sizes(reports):
    for r in reports:
        config, m = CONFIGS[r["model"]], r["adapter_size"]
        d, layers = config.hidden_size, config.num_hidden_layers
        assert r["base_params"] == PUBLISHED[r["model"]]
        assert r["adapter_params_per_layer"] == 2 * (2 * m * d + d + m)
        assert r["trainable_params"] == r["trainable_params_formula"] == paper_trainable(config, m, 2)
        assert r["total_params"] == r["base_params"] + layers * r["adapter_params_per_layer"] + d * 2 + 2


def test_bert_large_m64_trains_about_two_percent(reports):
    (r,) = [r for r in reports if r["model"] == "bert-large" and r["adapter_size"] == 64]
    print(f"BERT-large, m=64, 2-class head: {r['trainable_params']:,} trainable = {r['trainable_fraction']:.3%}")
    assert 0.017 < r["trainable_fraction"] < 0.023


def test_regression_head_has_one_output():
    config = BertConfig.base()
    r = parameter_report(config, 8, num_labels=1)
    assert r["trainable_params"] == paper_trainable(config, 8, 1)
