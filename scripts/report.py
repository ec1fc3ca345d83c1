r"""Turns sweep results into the paper's Table 1 (ours beside the paper's rows), a per-run appendix and a plot.
From the repository root:

    python -m scripts.report --results=sweeps/rte/results.jsonl,sweeps/cola/results.jsonl --out_dir=docs/results

writes `<out_dir>/report.md` and `<out_dir>/params_vs_score.png`, and, where the runs include top_k or
layernorm baselines, `<out_dir>/tradeoff.png` (the paper's Figures 3-4: best dev score against trained parameters,
one line per method and one panel per task) with `<out_dir>/tradeoff.md` (each point's best run, and the mean and
spread over the seeds of its setting); `--submission_dir` also gathers the selected runs' test predictions
into a GLUE submission folder (zip its contents and upload them to gluebenchmark.com).

Selection follows the paper: for each task and method, the run with the best dev score over the grid (learning
rate, epochs, seeds and, for "adapters (best size)", the adapter size). Our scores are dev, the paper's are test.
"""

import argparse
import collections
import dataclasses
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence

import matplotlib
from etils import epath

matplotlib.use("Agg")  # No display on TPU VMs or CI.
import matplotlib.figure
import matplotlib.pyplot as plt

from adapter_jax import cli, metrics, paper, submission, tasks
from adapter_jax.errors import DataError
from adapter_jax.figures import save_figure
from adapter_jax.results import OUR_SOURCE, RunResult
from adapter_jax.selection import BEST_SIZE, BestRuns, Method, best_runs, method_of
from scripts import markdown
from scripts.tradeoff import (
    TRADEOFF_FILE,
    TRADEOFF_TABLE_FILE,
    has_tradeoff,
    plot_tradeoff,
    render_tradeoff,
    tradeoff_points,
)

PAPER_SOURCE = "paper (GLUE test)"
# The paper's "total params" counts one task-specific copy for each of the nine GLUE tasks.
NUM_GLUE_TASKS = len(tasks.GLUE_TASKS)
# How a dev_metrics key names MNLI's mismatched accuracy, e.g. "accuracy_mm", "mm/accuracy", "mismatched_acc".
_MISMATCHED = re.compile(r"mismatched|(^|[^a-z])mm([^a-z]|$)")


def load_results(paths: Iterable[epath.PathLike]) -> list[RunResult]:
    """Every run in the given results.jsonl files (local or gs://), in file order; a malformed line raises
    DataError naming it."""
    runs = []
    for path in map(epath.Path, paths):
        if not path.is_file():
            raise DataError(f"results file not found: {path}")
        for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                text = line.decode("utf-8")
                if text.strip():
                    runs.append(RunResult.from_dict(json.loads(text)))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from e
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from e
    return runs


def column_scores(run: RunResult) -> dict[str, float]:
    """The Table 1 columns this run fills, in percent. An MNLI run fills MNLI-m (its score) and MNLI-mm."""
    task = run.task.lower().replace("-", "_")
    task = {"sst_2": "sst2", "sts_b": "stsb", "mnli_matched": "mnli_m", "mnli_mismatched": "mnli_mm"}.get(task, task)
    if task != "mnli":
        return {task: 100 * run.score} if task in paper.COLUMNS else {}
    scores = {"mnli_m": 100 * run.score}
    mismatched = [v for k, v in (run.dev_metrics or {}).items() if _MISMATCHED.search(k.lower())]
    if mismatched:
        scores["mnli_mm"] = 100 * mismatched[0]
    return scores


def _method_order(method: Method) -> tuple:
    source, name = method
    prefixes = ("full", BEST_SIZE, "adapters", "top_k", "")
    family = next(i for i, prefix in enumerate(prefixes) if name.startswith(prefix))
    return source != OUR_SOURCE, source, family, int(re.sub(r"\D", "", name) or 0), name


@dataclasses.dataclass(frozen=True)
class _Row:
    """One table row or plot point, the paper's or ours: scores per Table 1 column in percent."""

    label: str
    source: str
    fraction: float  # trained parameters per task / base model
    scores: Mapping[str, float]
    total: float  # total parameters for nine tasks / base model
    glue_score: float  # percent; NaN where the runs do not cover all nine tasks

    def mean(self, columns: Sequence[str]) -> float | None:
        values = [self.scores[c] for c in columns if c in self.scores]
        return statistics.fmean(values) if values else None


def glue_score(by_task: Mapping[str, RunResult]) -> float:
    """The GLUE score, in percent, of one method's best run per task; NaN unless they cover all nine tasks.

    It needs every metric of every dev split (MNLI's two), which our runs keep in `all_dev_metrics`.
    """
    per_column = {
        tasks.TASKS[name].result_name(split): split_metrics
        for name, run in by_task.items()
        if name in tasks.TASKS
        for split, split_metrics in (run.all_dev_metrics or {}).items()
    }
    if not set(tasks.GLUE_SCORE_COLUMNS) <= set(per_column):
        return math.nan
    return 100 * metrics.glue_score(per_column)


def _rows(best: BestRuns) -> list[_Row]:
    rows = [
        _Row(r.name, PAPER_SOURCE, r.trained_fraction, r.scores, r.total_params, r.glue_score) for r in paper.TABLE_1
    ]
    for method in sorted(best, key=_method_order):
        by_task = best[method]
        scores = {c: s for run in by_task.values() for c, s in column_scores(run).items()}
        fractions = [run.trainable_fraction for run in by_task.values() if run.trainable_fraction is not None]
        fraction = statistics.fmean(fractions) if fractions else math.nan
        # The paper's convention: one shared base model (unless every task trains all of it) plus, for each of
        # the nine GLUE tasks, the parameters it trains; we extrapolate our tasks' mean to nine.
        total = NUM_GLUE_TASKS * fraction + (1.0 if fraction < 1 else 0.0)
        rows.append(_Row(method[1], method[0], fraction, scores, total, glue_score(by_task)))
    return rows


def _our_columns(rows: Sequence[_Row]) -> list[str]:
    """The columns our runs fill (all nine when there are none), so every row is averaged over the same ones."""
    ours = {c for row in rows if row.source != PAPER_SOURCE for c in row.scores}
    return [c for c in paper.COLUMNS if c in ours] or list(paper.COLUMNS)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _percent(fraction: float) -> str:
    percent = 100 * fraction
    return markdown.cell(percent, ".0f" if percent >= 10 else ".2g", "%")


def render_table(best: BestRuns, runs: Sequence[RunResult] = ()) -> str:
    """Markdown: Table 1 in the paper's layout with its rows beside ours, then every run in `runs`."""
    rows = _rows(best)
    avg_columns = _our_columns(rows)
    all_columns = len(avg_columns) == len(paper.COLUMNS)
    avg_title = "Avg" if all_columns else f"Avg ({len(avg_columns)} of {len(paper.COLUMNS)} columns)"
    header = ["Method", "Source", "Total params", "Trained params / task"]
    header += [paper.COLUMN_TITLES[c] for c in paper.COLUMNS] + [avg_title, "GLUE score"]
    body = []
    for row in rows:
        partial = any(c not in row.scores for c in avg_columns)
        cells = [row.label, row.source, markdown.cell(row.total, ".1f", "x"), _percent(row.fraction)]
        cells += [markdown.cell(row.scores.get(c), ".1f") for c in paper.COLUMNS]
        cells.append(markdown.cell(row.mean(avg_columns), ".1f", " (partial)" if partial else ""))
        cells.append(markdown.cell(row.glue_score, ".1f"))
        body.append(cells)
    parts = [
        "## Houlsby et al. (2019) Table 1 (BERT-large, GLUE test) beside our runs (their own model, dev)",
        markdown.table(header, body),
        (
            f"Paper rows: GLUE test server, percent. Ours: dev set, best run per task and method. {avg_title} is "
            f"the mean over the columns our runs fill, for every row alike. GLUE score: the paper's own \"Total\", "
            f"the GLUE server's score, which also counts WNLI; for our rows the same score on dev, where a method has "
            f"runs on all nine tasks. Total params for our rows: 1 shared base model + "
            f"{NUM_GLUE_TASKS} x the mean trained fraction, the paper's convention for nine tasks. MRPC/QQP F1, "
            f"STS-B Spearman, CoLA Matthews, accuracy elsewhere."
        ),
    ]
    if runs:
        parts += ["## Every run", _render_runs(best, runs)]
    return "\n\n".join(parts) + "\n"


def _render_runs(best: BestRuns, runs: Sequence[RunResult]) -> str:
    selected = {id(run) for by_task in best.values() for run in by_task.values()}
    header = ["Task", "Method", "Source", "LR", "Epochs", "Size", "Seed", "Score", "Trained params", "Wall time (min)",
              "Selected"]

    def key(r: RunResult) -> tuple:
        return r.task, _method_order((r.trainer, method_of(r))), r.learning_rate or 0, r.num_epochs or 0, r.seed or 0

    body = [
        [
            run.task, method_of(run), run.trainer, markdown.cell(run.learning_rate, "g"),
            markdown.cell(run.num_epochs, "g"), markdown.cell(run.adapter_size, "g"), markdown.cell(run.seed, "g"),
            markdown.cell(100 * run.score, ".2f"), _percent(_or_nan(run.trainable_fraction)),
            markdown.cell(_or_nan(run.wall_time_s) / 60, ".1f"), "yes" if id(run) in selected else "",
        ]
        for run in sorted(runs, key=key)
    ]
    return markdown.table(header, body)


def _family(label: str) -> str:
    if label.startswith("adapters"):
        return "adapters"
    return "fine-tuning" if label.startswith(("top_k", "full")) else label


def plot(best: BestRuns, path: epath.PathLike, per_task: bool = False) -> epath.Path:
    """The paper's Figure 1 kind: score vs trained parameters per task (log x), adapters vs fine-tuning.

    One panel with each method's mean over the columns our runs fill (methods missing one of them are left out),
    or with `per_task` one panel per column. Adapter sizes and fine-tuning depths (top_k up to full) are joined
    as curves, one colour per family in every panel; other sources are dashed, the paper's rows hollow.
    """
    rows = _rows(best)
    avg_columns = _our_columns(rows)
    panels = [[c] for c in avg_columns] if per_task else [avg_columns]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.0, 4.5 * ncols), 4.5 * nrows), squeeze=False)
    colors = collections.defaultdict(lambda: f"C{len(colors)}")
    for ax, columns in zip(axes.flat, panels):
        curves = collections.defaultdict(list)
        for row in rows:
            # A mean over fewer columns than the panel's is not comparable; per-task panels show such rows.
            if any(c not in row.scores for c in columns) or math.isnan(row.fraction):
                continue
            x, y = 100 * row.fraction, row.mean(columns)
            if row.source == PAPER_SOURCE:
                ax.scatter(x, y, facecolors="none", edgecolors="black")
                ax.annotate(row.label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            elif row.label == BEST_SIZE:
                ax.scatter(x, y, marker="*", s=90, color=colors["adapters"], label=f"{BEST_SIZE} [{row.source}]")
            else:
                curves[_family(row.label), row.source].append((x, y))
        for (family, source), points in sorted(curves.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", color=colors[family], linestyle="-" if source == OUR_SOURCE else "--",
                    label=f"{family} [{source}]")
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters per task (% of base model)")
        ax.set_ylabel("score (%)")
        title = paper.COLUMN_TITLES[columns[0]] if per_task else f"mean of {len(columns)} GLUE columns"
        ax.set_title(f"{title} (ours: dev, paper: test)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # Panels may show different methods, so the one legend gathers them all.
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    axes.flat[0].legend(legend.values(), legend.keys(), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def copy_submission(best: BestRuns, method: Method, out_dir: epath.PathLike) -> list[epath.Path]:
    """Copies the GLUE prediction files (*.tsv) of `method`'s best run per task into `out_dir`; returns them.

    The GLUE server wants one file per task (plus AX); tasks without predictions are left for the caller to see.
    """
    if method not in best:
        raise DataError(f"no runs for method {method}; have {sorted(best)}")
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for task, run in sorted(best[method].items()):
        predictions = run.test_predictions_dir
        if predictions is None:
            continue
        if task not in tasks.TASKS:
            raise DataError(f"{run.workdir or task}: unknown task {task!r}; cannot tell which predictions it needs")
        # Every file the task's test sets need: a sweep stopped between two files (MNLI-m, MNLI-mm) left one.
        files = [epath.Path(predictions) / name for name in submission.expected_files(tasks.TASKS[task])]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise DataError(f"{task}: {predictions} lacks {missing}; rerun the sweep to write them")
        for f in files:
            (out_dir / f.name).write_bytes(f.read_bytes())
            copied.append(out_dir / f.name)
    return copied


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, type=lambda s: [cli.absolute_path(p) for p in s.split(",")],
                        help="comma-separated results.jsonl files (one per sweep)")
    parser.add_argument("--out_dir", required=True, type=lambda s: epath.Path(cli.absolute_path(s)))
    parser.add_argument("--per_task_plot", action="store_true", help="one plot panel per task instead of the mean")
    parser.add_argument("--submission_dir", type=lambda s: epath.Path(cli.absolute_path(s)),
                        help="gather test predictions here")
    parser.add_argument("--submission_method", default=BEST_SIZE, help="method whose best runs are submitted")
    parser.add_argument("--submission_source", default=OUR_SOURCE)
    args = parser.parse_args(argv)

    try:
        _report(parser, args)
    except DataError as e:  # a results or predictions file at fault: its name, not a traceback
        parser.exit(2, f"error: {e}\n")
    except OSError as e:  # an output folder that cannot be written (read-only, a file of that name)
        parser.exit(2, f"error: cannot write {e.filename or args.out_dir}: {e.strerror or e}\n")


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    runs = load_results(args.results)
    if not runs:
        parser.error(f"no runs in {args.results}")
    best = best_runs(runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = args.out_dir / "report.md"
    report.write_text(render_table(best, runs), encoding="utf-8")
    print(f"wrote {report} and {plot(best, args.out_dir / 'params_vs_score.png', args.per_task_plot)}")
    points = tradeoff_points(best, runs)
    if has_tradeoff(points):
        plot_tradeoff(best, args.out_dir / TRADEOFF_FILE, runs)
        (args.out_dir / TRADEOFF_TABLE_FILE).write_text(render_tradeoff(points), encoding="utf-8")
        print(f"wrote {args.out_dir / TRADEOFF_FILE} and {args.out_dir / TRADEOFF_TABLE_FILE}")
    if args.submission_dir:
        method = (args.submission_source, args.submission_method)
        copied = copy_submission(best, method, args.submission_dir)
        missing = [task for task, run in sorted(best[method].items()) if not run.test_predictions_dir]
        print(f"copied {len(copied)} prediction files to {args.submission_dir}; "
              f"no predictions for: {missing or 'none'}")

if __name__ == "__main__":
    with cli.uncaught_errors():
        main()
