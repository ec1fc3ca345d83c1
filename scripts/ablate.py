r"""The paper's adapter ablation (Houlsby et al. 2019, Figure 6): dev scores of trained adapters with those of
every contiguous span of layers removed, as JSON and a heatmap. From the repository root:

    python -m scripts.ablate --workdir=/tmp/adapter-jax/sst2 --out_dir=docs/results/ablation/sst2
    python -m scripts.ablate --replot=docs/results/ablation/sst2/ablation.json   # the heatmap again, from the JSON

loads <workdir>/export onto its base model and, with no retraining, scores the first dev split with the adapters of
layers first..last set to the identity, for every 0 <= first <= last < number of layers, and with none removed.
Writes `<out_dir>/ablation.json` (the scores, the unablated score and the majority-class score) and
`<out_dir>/ablation.png`; --out_dir defaults to the workdir. The config (default configs/glue.py) gives the base
model, data and evaluation batch; the export's own task, adapter settings and sequence length replace its own,
and any key can be overridden as in training, e.g. --config.model=bert-large-uncased --config.glue_dir=DIR.
"""

import argparse
import json
import pathlib
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Self

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import traverse_util
from ml_collections import config_flags

matplotlib.use("Agg")  # No display on TPU VMs or CI.
import matplotlib.figure
import matplotlib.pyplot as plt

from adapter_jax import (
    checks,
    cli,
    distributed,
    evaluation,
    export,
    figures,
    input_pipeline,
    metrics,
    steps,
    tasks,
    trainable,
)
from adapter_jax import experiment as experiment_lib
from adapter_jax.errors import CheckpointError, ConfigError, DataError
from adapter_jax.workdir import Workdir, is_primary_process, write_atomic

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "glue.py")
RESULTS_FILE = "ablation.json"
PLOT_FILE = "ablation.png"
# jax.monitoring's event for one XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT). The tests check that
# a first evaluation reports some, so a JAX that renames it fails them instead of counting nothing.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Both sites' up projections: zeroing them makes x + up(gelu(down(x))) exactly x.
_UP_PROJECTION = re.compile(r"bert/encoder/layer_(\d+)/.*/adapter/up/[^/]+")
# What the heatmap reads from an ablation.json.
_PLOTTED_KEYS = ("task", "split", "metric", "num_layers", "unablated", "majority", "spans")
# Annotating each cell stays legible up to BERT-base's 12 layers.
_MAX_ANNOTATED_LAYERS = 12

Params = Mapping[str, Any]


def spans(num_layers: int) -> list[tuple[int, int]]:
    """Every contiguous span (first, last) of layers, first <= last, in the heatmap's reading order."""
    return [(first, last) for first in range(num_layers) for last in range(first, num_layers)]


def adapter_layer(path: str) -> int | None:
    """The layer whose adapter's up projection is at `path`; None for any other parameter."""
    match = _UP_PROJECTION.fullmatch(path)
    return int(match.group(1)) if match else None


def take_adapters(params: Params, source: Params, layers: Collection[int]) -> dict:
    """`params` with the adapters' up projections of `layers` taken from `source`, a tree of the same structure.

    Leaves are reused, not copied: trees already replicated on the devices give a tree on the devices.
    """
    layers = set(layers)
    replacement = traverse_util.flatten_dict(source)
    return traverse_util.unflatten_dict({
        path: replacement[path] if adapter_layer(trainable.path_name(path)) in layers else leaf
        for path, leaf in traverse_util.flatten_dict(params).items()
    })


def remove_adapters(params: Params, layers: Collection[int]) -> dict:
    """`params` with the adapters of `layers` set to the identity, by zeroing their up projections.

    Shapes stay as they were, so an evaluation compiled for `params` serves the result unchanged.
    """
    return take_adapters(params, jax.tree.map(np.zeros_like, params), layers)


def majority_score(task: tasks.Task, labels: np.ndarray) -> float:
    """The task's main score for predicting the most frequent label for every example (the mean for regression)."""
    labels = np.asarray(labels)
    constant = labels.mean() if task.is_regression else np.bincount(labels).argmax()
    predictions = np.full(labels.shape, constant, labels.dtype)
    return metrics.main_score(task, metrics.compute_metrics(task, predictions, labels))


class CompileCounter:
    """Counts the XLA compilations in this process (jax.monitoring's events) while entered."""

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        del duration_secs, kwargs
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> Self:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc_info: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


class Ablator:
    """Scores one experiment on one dataset with the adapters of any layers removed, without recompiling.

    The trained parameters and a copy with every adapter zeroed are replicated once; a removal picks each
    up projection from one or the other, so every call passes arrays of the same shapes and layout, and the
    evaluation compiled by the first call serves all the others.
    """

    def __init__(
        self,
        experiment: experiment_lib.Experiment,
        config: ml_collections.ConfigDict,
        dataset: input_pipeline.TokenizedDataset,
    ):
        self.task = experiment.task
        self.num_layers = experiment.bert_config.num_hidden_layers
        self._dataset = dataset
        self._evaluator = evaluation.Evaluator(experiment, config)
        self._frozen = steps.replicate_frozen(experiment.frozen_params, config.dtype)
        self._trained = steps.replicate(experiment.trainable_params)
        self._removed = steps.replicate(remove_adapters(experiment.trainable_params, range(self.num_layers)))

    def _params(self, layers: Collection[int]) -> dict:
        return take_adapters(self._trained, self._removed, layers)

    def logits(self, layers: Collection[int] = ()) -> np.ndarray:
        """The dataset's logits with the adapters of `layers` removed."""
        return self._evaluator.logits(self._params(layers), self._frozen, self._dataset)

    def metrics(self, layers: Collection[int] = ()) -> dict[str, float]:
        """The task's metrics on the dataset with the adapters of `layers` removed."""
        datasets = {"ablated": self._dataset}
        return self._evaluator.evaluate(self._params(layers), self._frozen, datasets, self.task)["ablated"]


def ablate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Dev scores of the adapters exported in `workdir` with every span of layers removed; see the module doc."""
    export_path = Workdir(workdir).export_dir
    experiment, config = export.load(config, export_path, purpose="evaluate")
    if experiment.spec.mode != "adapters":
        raise CheckpointError(f"{export_path} holds a {experiment.spec.mode!r} run, which has no adapters to remove")
    task = experiment.task
    split = task.dev_splits[0]
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    dataset = experiment_lib.load_dataset(config, task, split, tokenizer)
    ablator = Ablator(experiment, config, dataset)
    with CompileCounter() as first_evaluation:
        unablated = ablator.metrics()
    results = []
    with CompileCounter() as span_evaluations:
        for first, last in spans(ablator.num_layers):
            span_metrics = ablator.metrics(range(first, last + 1))
            results.append(
                {"first": first, "last": last, "score": metrics.main_score(task, span_metrics), "metrics": span_metrics}
            )
    return {
        "task": task.name,
        "split": split,
        "metric": task.main_metric,
        "num_examples": len(dataset),
        "num_layers": ablator.num_layers,
        "adapter_layers": list(experiment.spec.adapter.layers or range(ablator.num_layers)),
        "model": config.model,
        "export": str(export_path),
        "unablated": metrics.main_score(task, unablated),
        "unablated_metrics": unablated,
        "majority": majority_score(task, dataset.labels),
        "spans": results,
        # Proof that removing adapters reuses the evaluation compiled for the unablated model.
        "compilations": {"unablated": first_evaluation.count, "spans": span_evaluations.count},
    }


def score_grid(results: Mapping[str, Any]) -> np.ndarray:
    """[last layer, first layer] -> score in percent; NaN where first > last (no such span)."""
    num_layers = results["num_layers"]
    grid = np.full((num_layers, num_layers), np.nan)
    for span in results["spans"]:
        grid[span["last"], span["first"]] = 100 * span["score"]
    return grid


def plot(results: Mapping[str, Any], path: epath.PathLike) -> matplotlib.figure.Figure:
    """The heatmap of the paper's Figure 6 (first ablated layer across, last ablated layer down), written to
    `path`; returns the figure (closed) so that its data can be read back."""
    grid = score_grid(results)
    num_layers = results["num_layers"]
    unablated, majority = 100 * results["unablated"], 100 * results["majority"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * num_layers + 2.5), max(4.5, 0.5 * num_layers + 2.5)))
    # The colour runs from the majority class (the collapse the paper saw with every adapter removed) to the
    # unablated score, widened if a span scores outside that range.
    vmin, vmax = min(np.nanmin(grid), majority), max(np.nanmax(grid), unablated)
    image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax)
    if num_layers <= _MAX_ANNOTATED_LAYERS:
        for span in results["spans"]:
            score = 100 * span["score"]
            # viridis is dark at the bottom of its range and light at the top.
            color = "white" if score < (vmin + vmax) / 2 else "black"
            ax.text(span["first"], span["last"], f"{score:.1f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(num_layers))
    ax.set_yticks(range(num_layers))
    ax.set_xlabel("first ablated layer")
    ax.set_ylabel("last ablated layer")
    metric = f"{results['split']} {results['metric']} (%)"
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{results['task']}: {metric}\nwith the adapters of layers first..last removed", fontsize=9)
    caption = (
        f"Unablated: {unablated:.1f}. Majority class: {majority:.1f}. Diagonal: one layer's adapters removed; "
        f"bottom left: all removed.\nThe paper (Fig. 6): removing one layer's adapters costs little, removing all "
        f"falls to the majority class, and the lower layers' adapters matter least."
    )
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    figures.save_figure(fig, path)
    return fig


def parse_config(args: Sequence[str]) -> ml_collections.ConfigDict:
    """The config of `--config=FILE[:ARG]` (default configs/glue.py) with its `--config.KEY=VALUE` overrides.

    Its own FlagValues, not absl's global FLAGS: scripts.sweep defines --config there too, and both modules
    may be imported into one process (the tests).
    """
    argv = [sys.argv[0], *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def read_results(results_file: epath.Path) -> dict[str, Any]:
    """An ablation.json as `ablate` wrote it; DataError naming the file and what is wrong with it otherwise."""
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {results_file}: {e}") from e
    missing = [key for key in _PLOTTED_KEYS if key not in results] if isinstance(results, dict) else _PLOTTED_KEYS
    if missing:
        raise DataError(f"{results_file}: not an ablation results file: it lacks {list(missing)}")
    num_layers, spans = results["num_layers"], results["spans"]
    if not (checks.positive_int(num_layers) and isinstance(spans, list)):
        raise DataError(f"{results_file}: num_layers must be a positive integer and spans a list")
    for index, span in enumerate(spans):
        layer = checks.number(0, num_layers - 1)
        if not (isinstance(span, dict) and checks.non_negative_int(span.get("first"))
                and checks.non_negative_int(span.get("last")) and layer(span["first"]) and layer(span["last"])
                and checks.number()(span.get("score"))):
            raise DataError(f"{results_file}: spans[{index}] is not a span of layers 0..{num_layers - 1} with a score")
    for key in ("unablated", "majority"):
        if not checks.number()(results[key]):
            raise DataError(f"{results_file}: {key} must be a number, not {results[key]!r}")
    return results


def replot(results_file: epath.Path, out_dir: epath.Path | None = None) -> dict[str, Any]:
    """Redraws the heatmap of a written ablation.json into `out_dir` (default: its own folder)."""
    results = read_results(results_file)
    path = (out_dir or results_file.parent) / PLOT_FILE
    plot(results, path)
    print(f"wrote {path}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=cli.absolute_path, help="a finished adapters run (holding export/)")
    source.add_argument("--replot", type=cli.absolute_path,
                        help="an ablation.json: redraw its heatmap only (no model, no data)")
    parser.add_argument("--out_dir", type=cli.absolute_path,
                        help="where ablation.json and ablation.png go (default: the workdir, or the folder of --replot)")
    distributed.add_arguments(parser)
    args, config_args = parser.parse_known_args(argv)
    if args.replot:
        with cli.exit_codes(OSError):  # OSError: the plot's folder cannot be written
            return replot(epath.Path(args.replot), epath.Path(args.out_dir) if args.out_dir else None)
    try:
        config = parse_config(config_args)
    except (flags.Error, AttributeError, TypeError, OSError) as e:  # how config_flags reports a bad override
        parser.error(f"--config: {e}")
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ConfigError as e:
        parser.error(str(e))
    with cli.exit_codes():
        results = ablate(config, args.workdir)
    if results["compilations"]["spans"]:
        print(f"warning: evaluating the spans compiled {results['compilations']['spans']} more times; the "
              f"evaluation was meant to compile once", file=sys.stderr)
    if is_primary_process():
        out_dir = epath.Path(args.out_dir or args.workdir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / RESULTS_FILE, json.dumps(results, indent=2))
        plot(results, out_dir / PLOT_FILE)
        print(f"{results['task']}: unablated {results['unablated']:.4f}, majority class {results['majority']:.4f}, "
              f"{len(results['spans'])} spans; wrote {out_dir / RESULTS_FILE} and {out_dir / PLOT_FILE}")
    return results


if __name__ == "__main__":
    with cli.uncaught_errors():
        main()
