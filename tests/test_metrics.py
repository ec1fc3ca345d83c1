"""GLUE metrics against scikit-learn and scipy, and the GLUE score against the leaderboard."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_jax import errors, metrics, tasks

FAST = settings(max_examples=60, deadline=None)


def classes(num_classes):
    """Equal-length (predictions, labels) arrays of class ids."""
    return st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n),
            st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n),
        )
    ).map(lambda pair: (np.array(pair[0]), np.array(pair[1])))


@pytest.mark.filterwarnings("ignore:A single label was found")
@FAST
@given(classes(2))
def test_binary_metrics_match_sklearn(pair):
    predictions, labels = pair
    assert metrics.accuracy(predictions, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions))
    assert metrics.f1(predictions, labels) == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions, zero_division=0.0)
    )
    assert metrics.matthews_corr(predictions, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12
    )


@pytest.mark.filterwarnings("ignore:A single label was found")
@FAST
@given(classes(3))
def test_multiclass_matthews_matches_sklearn(pair):
    predictions, labels = pair
    assert metrics.matthews_corr(predictions, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, 300)
    predictions = labels + rng.normal(0, 1.5, 300)
    assert metrics.pearson(predictions, labels) == pytest.approx(scipy.stats.pearsonr(predictions, labels)[0])
    assert metrics.spearman(predictions, labels) == pytest.approx(scipy.stats.spearmanr(predictions, labels)[0])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@FAST
@given(st.lists(st.integers(0, 5), min_size=3, max_size=50), st.randoms())
def test_spearman_with_ties_matches_scipy(values, random):
    labels = np.array(values, np.float64)
    predictions = np.array(random.sample(values, len(values)), np.float64)  # heavy ties on both sides
    expected = scipy.stats.spearmanr(predictions, labels)[0]
    if np.isnan(expected):  # scipy leaves a constant input undefined; ours is 0
        assert metrics.spearman(predictions, labels) == 0.0
    else:
        assert metrics.spearman(predictions, labels) == pytest.approx(expected)
    np.testing.assert_allclose(metrics._average_ranks(labels), scipy.stats.rankdata(labels))


def test_degenerate_inputs_score_zero_not_nan():
    assert metrics.f1(np.zeros(4), np.zeros(4)) == 0.0
    assert metrics.matthews_corr(np.ones(4), np.array([0, 1, 0, 1])) == 0.0
    assert metrics.pearson(np.ones(4), np.arange(4)) == 0.0


def test_compute_metrics_returns_the_tasks_metrics():
    labels = np.array([1, 0, 1, 1, 0])
    predictions = np.array([1, 0, 0, 1, 1])
    assert metrics.compute_metrics(tasks.get_task("mrpc"), predictions, labels) == pytest.approx(
        {"f1": 2 / 3, "accuracy": 0.6}
    )
    cola = metrics.compute_metrics(tasks.get_task("cola"), predictions, labels)
    assert cola == pytest.approx({"matthews_corr": 1 / 6})
    stsb = metrics.compute_metrics(tasks.get_task("stsb"), np.array([0.1, 2.0, 4.0]), np.array([0.0, 3.0, 3.5]))
    assert set(stsb) == {"pearson", "spearman"} and stsb["spearman"] == pytest.approx(1.0)
    assert metrics.main_score(tasks.get_task("mrpc"), {"f1": 0.9, "accuracy": 0.8}) == 0.9
    with pytest.raises(errors.DataError, match="3 predictions for 2 labels"):
        metrics.compute_metrics(tasks.get_task("rte"), np.zeros(3), np.zeros(2))


def test_glue_score_reproduces_the_bert_large_leaderboard_row():
    """BERT-large on the GLUE leaderboard (Devlin et al., 2019): score 80.5."""
    row = {
        "cola": {"matthews_corr": 0.605},
        "sst2": {"accuracy": 0.949},
        "mrpc": {"f1": 0.893, "accuracy": 0.854},
        "stsb": {"pearson": 0.876, "spearman": 0.865},
        "qqp": {"f1": 0.721, "accuracy": 0.893},
        "mnli_m": {"accuracy": 0.867},
        "mnli_mm": {"accuracy": 0.859},
        "qnli": {"accuracy": 0.927},
        "rte": {"accuracy": 0.701},
        "wnli": {"accuracy": 0.651},
        "ax": {"matthews_corr": 0.396},  # reported beside the score, not in it
    }
    assert round(100 * metrics.glue_score(row), 1) == 80.5
    del row["wnli"]
    with pytest.raises(errors.ConfigError, match="wnli"):
        metrics.glue_score(row)
