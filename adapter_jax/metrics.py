"""GLUE metrics in numpy, on the host.

Scores are fractions: accuracy and F1 in [0, 1], correlations in [-1, 1]; multiply by 100
only when printing a table. Where a score is undefined (a constant input to a correlation,
no positives for F1) it is 0.0, as scikit-learn does for F1 and Matthews correlation, so
that picking the best run never meets a NaN.
"""

from collections.abc import Mapping

import numpy as np

from adapter_jax import errors
from adapter_jax.tasks import GLUE_SCORE_COLUMNS, TASKS, Task


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 with class 1 as the positive class."""
    predicted, actual = np.asarray(predictions) == 1, np.asarray(labels) == 1
    true_positives = np.sum(predicted & actual)
    denominator = np.sum(predicted) + np.sum(actual)
    return float(2 * true_positives / denominator) if denominator else 0.0


def matthews_corr(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation; for more than two classes, Gorodkin's R_K (the GLUE AX metric)."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    confusion = np.zeros((len(classes), len(classes)), np.float64)
    np.add.at(confusion, (encoded[: len(labels)], encoded[len(labels) :]), 1)
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * n - predicted_counts @ true_counts
    variance = (n**2 - predicted_counts @ predicted_counts) * (n**2 - true_counts @ true_counts)
    return float(covariance / np.sqrt(variance)) if variance else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    x = np.asarray(predictions, np.float64) - np.mean(predictions)
    y = np.asarray(labels, np.float64) - np.mean(labels)
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1; tied values share the mean of their ranks (scipy.stats.rankdata 'average')."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts_group) - 1
    group_bounds = np.r_[np.flatnonzero(starts_group), len(values)]
    # Positions first..last (0-based) get the mean rank (first + last) / 2 + 1.
    mean_rank = (group_bounds[:-1] + group_bounds[1:] - 1) / 2 + 1
    ranks = np.empty(len(values), np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    return pearson(_average_ranks(predictions), _average_ranks(labels))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corr": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics: predictions are class indices (floats for STS-B), labels likewise."""
    if len(predictions) != len(labels) or not len(labels):
        raise errors.DataError(
            f"{task.name}: {len(predictions)} predictions for {len(labels)} labels"
        )
    return {name: METRICS[name](predictions, labels) for name in task.metrics}


def main_score(task: Task, metrics: Mapping[str, float]) -> float:
    """The one number that ranks runs of `task` (task.main_metric)."""
    return float(metrics[task.main_metric])


def glue_score(per_task_metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The GLUE leaderboard score: the mean over the nine tasks of each task's score.

    Keys are leaderboard columns as `Task.result_name` gives them: task names, with MNLI as
    'mnli_m' and 'mnli_mm'. A task with two metrics (MRPC, QQP: F1 and accuracy; STS-B:
    Pearson and Spearman) scores their unweighted mean (Wang et al., 2019, GLUE, Sec. 4).
    MNLI counts once, as the mean of matched and mismatched accuracy. AX (the diagnostic)
    is reported separately and not averaged in. This reproduces the leaderboard, e.g.
    BERT-large's 80.5. All nine tasks are required: a mean over fewer is not a GLUE score.
    """
    missing = [name for name in GLUE_SCORE_COLUMNS if name not in per_task_metrics]
    if missing:
        raise errors.ConfigError(f"glue_score needs results for {', '.join(missing)}")

    def score(column: str) -> float:
        task = TASKS[column.split("_")[0]]
        return float(np.mean([per_task_metrics[column][m] for m in task.metrics]))

    mnli = (score("mnli_m") + score("mnli_mm")) / 2
    others = [score(name) for name in GLUE_SCORE_COLUMNS if not name.startswith("mnli")]
    return float(np.mean(others + [mnli]))
