"""The paper's trade-off (Figures 3-4): for each task, the best dev score against trained parameters, one line
per method (adapter sizes, top-k depths, LayerNorm only, full fine-tuning), as a plot and a Markdown table."""

import collections
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import matplotlib
from etils import epath

matplotlib.use("Agg")  # No display on TPU VMs or CI.
import matplotlib.figure
import matplotlib.pyplot as plt

from adapter_jax import tasks
from adapter_jax.errors import DataError
from adapter_jax.figures import save_figure
from adapter_jax.results import OUR_SOURCE, RunResult
from adapter_jax.selection import BEST_SIZE, BestRuns, Method, method_of
from scripts import markdown

TRADEOFF_FILE = "tradeoff.png"
TRADEOFF_TABLE_FILE = "tradeoff.md"
# The methods of the paper's trade-off (Figures 3-4), by mode, in legend order.
TRADEOFF_METHODS: Mapping[str, str] = {
    "adapters": "adapters (size m)",
    "top_k": "fine-tuning the top k layers",
    "layernorm": "LayerNorm only",
    "full": "full fine-tuning",
}
# The paper's reading of its Figures 3-4, in the words of this repository's issue 14.
TRADEOFF_CLAIM = "Houlsby et al. (2019), Figs. 3-4: adapters dominate top-k fine-tuning at every parameter budget."


class TradeoffPoint(NamedTuple):
    trainable_params: int
    score: float  # percent: the best dev run (the paper's selection)
    label: str  # what varies along the method's line: "m=8", "k=2", or ""
    seed_scores: tuple[float, ...]  # percent: every seed of the best run's setting (learning rate and epochs)
    setting: str  # that setting, e.g. "lr 0.003, 3 epochs"


def _setting(run: RunResult) -> tuple:
    """What the seeds of one setting share: source, task, method and point, learning rate and epochs."""
    return run.trainer, run.task, method_of(run), run.learning_rate, run.num_epochs


def tradeoff_points(best: BestRuns, runs: Iterable[RunResult] = ()) -> dict[str, dict[Method, list[TradeoffPoint]]]:
    """Task -> (source, mode) -> that method's points, fewest trained parameters first: at each adapter size
    or k, the best dev run over learning rate, epochs and seeds (best_runs' choice), with the scores of every
    seed among `runs` that shares its learning rate and epochs (its own score alone if `runs` is empty)."""
    seeds = collections.defaultdict(list)
    for run in runs:
        seeds[_setting(run)].append(100 * run.score)
    points: dict[str, dict[Method, list[TradeoffPoint]]] = collections.defaultdict(dict)
    for (source, method), by_task in best.items():
        if method == BEST_SIZE:
            continue
        for task, run in by_task.items():
            if run.mode not in TRADEOFF_METHODS or not run.trainable_params:
                continue
            label = {"adapters": f"m={run.adapter_size}", "top_k": f"k={run.top_k}"}.get(run.mode, "")
            epochs = "?" if run.num_epochs is None else run.num_epochs
            setting = f"lr {markdown.cell(run.learning_rate, 'g')}, {epochs} epochs"
            line = points[task].setdefault((source, run.mode), [])
            scores = tuple(seeds.get(_setting(run), [100 * run.score]))
            line.append(TradeoffPoint(run.trainable_params, 100 * run.score, label, scores, setting))
    return {task: {method: sorted(line) for method, line in lines.items()} for task, lines in sorted(points.items())}


def render_tradeoff(points: Mapping[str, Mapping[Method, Sequence[TradeoffPoint]]]) -> str:
    """The trade-off's points as a Markdown table: the best run, and mean, spread and range over its setting's seeds."""
    body = []
    for task, lines in points.items():
        for (source, mode), line in sorted(lines.items(), key=lambda item: _line_order(*item[0])):
            for point in line:
                scores = point.seed_scores
                spread = f" ± {statistics.stdev(scores):.1f}" if len(scores) > 1 else ""
                body.append([
                    task, TRADEOFF_METHODS[mode] + ("" if source == OUR_SOURCE else f" [{source}]"), point.label or "-",
                    f"{point.trainable_params:,}", point.setting, f"{point.score:.1f}", str(len(scores)),
                    f"{statistics.fmean(scores):.1f}{spread}", f"{min(scores):.1f}-{max(scores):.1f}",
                ])
    header = ["task", "method", "point", "trained params", "best setting", "best run", "seeds", "mean ± sd",
              "range"]
    return (
        "# Trade-off: trained parameters against dev score\n\n"
        + markdown.table(header, body)
        + "\n\nbest run: the best dev score over learning rate, epochs and seeds (the paper's selection, plotted as "
        "the line). seeds, mean ± sd, range: every seed of that best run's learning rate and epochs (sd: sample "
        "standard deviation), drawn as the bar and the dash at each point.\n"
    )


def has_tradeoff(points: Mapping[str, Mapping[Method, Sequence[TradeoffPoint]]]) -> bool:
    """Whether the runs include the baselines the trade-off plot is for (top-k or LayerNorm-only)."""
    return any(mode in ("top_k", "layernorm") for lines in points.values() for _, mode in lines)


def _line_order(source: str, mode: str) -> tuple:
    return source != OUR_SOURCE, source, list(TRADEOFF_METHODS).index(mode)


def plot_tradeoff(best: BestRuns, path: epath.PathLike, runs: Sequence[RunResult] = ()) -> matplotlib.figure.Figure:
    """The paper's Figures 3-4 kind, one panel per task: best dev score against trained parameters (log x),
    one line per method (adapter sizes, top-k depths, LayerNorm only, full fine-tuning), other sources dashed.
    Where `runs` hold several seeds of a point's best setting, a bar spans their range and a dash marks their mean.

    Writes `path` and returns the figure (closed) so that its lines' data can be read back.
    """
    points = tradeoff_points(best, runs)
    if not points:
        raise DataError("no adapters, top_k, layernorm or full runs with trainable_params to plot")
    ncols = min(3, len(points))
    nrows = math.ceil(len(points) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.0, 4.5 * ncols), 4.5 * nrows + 0.5), squeeze=False)
    modes = list(TRADEOFF_METHODS)
    for ax, (task, lines) in zip(axes.flat, points.items()):
        for (source, mode), line in sorted(lines.items(), key=lambda item: _line_order(*item[0])):
            xs, ys = [point.trainable_params for point in line], [point.score for point in line]
            ours = source == OUR_SOURCE
            ax.plot(xs, ys, marker="o" if ours else "s", color=f"C{modes.index(mode)}", linestyle="-" if ours else "--",
                    label=TRADEOFF_METHODS[mode] + ("" if ours else f" [{source}]"))
            for point in line:
                ax.annotate(point.label, (point.trainable_params, point.score), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
            seeded = [point for point in line if len(point.seed_scores) > 1]
            if seeded:
                xs = [point.trainable_params for point in seeded]
                color = f"C{modes.index(mode)}"
                ax.vlines(xs, [min(p.seed_scores) for p in seeded], [max(p.seed_scores) for p in seeded],
                          color=color, alpha=0.4, linewidth=3)
                ax.scatter(xs, [statistics.fmean(p.seed_scores) for p in seeded], marker="_", color=color, s=60)
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters per task")
        metric = tasks.TASKS[task].main_metric if task in tasks.TASKS else "score"
        ax.set_ylabel(f"best dev {metric} (%)")
        ax.set_title(task, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(points):]:
        ax.set_visible(False)
    caption = (
        f"{TRADEOFF_CLAIM}\nEach point: the best dev run over learning rate, epochs and seeds at that size or k; "
        f"bar and dash, where drawn: the range and the mean of that run's setting over its seeds."
    )
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save_figure(fig, path)
    return fig
