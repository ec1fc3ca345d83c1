"""Which runs a report selects, as the paper does: for each task and method (source and method name), the run
with the best dev score over the grid (learning rate, epochs, seeds and, for "adapters (best size)", the adapter
size). scripts.report tabulates them; scripts.sweep predicts their test sets."""

import collections
from collections.abc import Iterable

from adapter_jax.results import RunResult

Method = tuple[str, str]  # (source, method name)
BestRuns = dict[Method, dict[str, RunResult]]  # method -> task -> its best run

BEST_SIZE = "adapters (best size)"


def method_of(run: RunResult) -> str:
    """The run's method as the table names it, e.g. "adapters (size 64)", "top_k (k=3)", "full fine-tuning"."""
    mode = run.mode
    if mode == "adapters":
        return f"adapters (size {run.adapter_size})"
    if mode == "full":
        return "full fine-tuning"
    if mode == "top_k":
        return f"top_k (k={run.top_k})"
    return mode


def best_runs(runs: Iterable[RunResult]) -> BestRuns:
    """For each (source, method) and task, the run with the best dev score; ties go to fewer trained params."""
    best: BestRuns = collections.defaultdict(dict)
    for run in runs:
        source = run.trainer
        methods = [method_of(run)] + ([BEST_SIZE] if run.mode == "adapters" else [])
        for method in methods:
            current = best[source, method].get(run.task)
            if current is None or _rank(run) > _rank(current):
                best[source, method][run.task] = run
    return dict(best)


def _rank(run: RunResult) -> tuple[float, float]:
    return run.score, -(run.trainable_params or 0)
