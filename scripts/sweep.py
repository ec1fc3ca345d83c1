"""The paper's hyperparameter sweep for one task, resumable, with one results file.

Runs every point of (mode x learning rate x epochs x adapter size x seed), each in its own workdir
under --workdir; finished runs (a summary.json) are skipped and interrupted ones resume from their
checkpoints, so a preempted sweep continues where it stopped when rerun. Every finished run is a
line of <workdir>/results.jsonl; the best run on dev per mode is printed and written to best.json.
Run from the repository root:

    # the paper's grid (Section 3.1) for RTE on BERT-large
    python -m scripts.sweep --config=configs/glue.py:rte --workdir=/tmp/sweep/rte \
        --config.model=bert-large-uncased
    # a sub-grid, with the full fine-tuning baseline
    python -m scripts.sweep --config=configs/glue.py:rte --workdir=/tmp/sweep/rte \
        --modes=adapters,full --learning_rates=3e-4,3e-3 --epochs=3 --adapter_sizes=64 --seeds=0
"""

import itertools
import json
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from adapter_jax import distributed, paper, predict, run_utils, submission, train
from adapter_jax.errors import (
    AdapterJaxError,
    ConfigError,
    NonFiniteLoss,
    PeerLost,
    Preempted,
    WriteFailed,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/glue.py:rte; --config.KEY overrides.")
run_utils.define_path_flag("workdir", None, "Root folder: one sub-folder per run, results.jsonl, best.json.")
flags.DEFINE_list("modes", ["adapters"], "Modes to run: adapters, full, top_k, layernorm.")
flags.DEFINE_list("learning_rates", [str(lr) for lr in paper.LEARNING_RATES], "Learning rates.")
flags.DEFINE_list("epochs", [str(e) for e in paper.EPOCHS], "Epoch counts.")
flags.DEFINE_list("adapter_sizes", [str(m) for m in paper.ADAPTER_SIZES], "Adapter sizes (adapters mode only).")
flags.DEFINE_list("seeds", [str(s) for s in range(paper.NUM_SEEDS)], "Seeds; the paper takes the best on dev.")
flags.DEFINE_list("top_k", ["1"], "Layers fine-tuned in top_k mode.")
flags.DEFINE_bool("predict_test", True, "Write each run's GLUE test predictions (for scripts.report).")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])

RESULTS_FILE = "results.jsonl"
FAILURES_FILE = "failures.jsonl"


def grid(
    modes: Sequence[str],
    learning_rates: Sequence[float],
    epochs: Sequence[int],
    adapter_sizes: Sequence[int],
    seeds: Sequence[int],
    top_k: Sequence[int] = (1,),
) -> Iterator[dict[str, Any]]:
    """Config overrides of every run; adapter sizes vary only in adapters mode, k only in top_k mode."""
    for mode in modes:
        sizes = adapter_sizes if mode == "adapters" else [0]
        ks = top_k if mode == "top_k" else [0]
        for lr, num_epochs, size, k, seed in itertools.product(learning_rates, epochs, sizes, ks, seeds):
            overrides = {"mode": mode, "learning_rate": lr, "num_epochs": num_epochs, "seed": seed, "top_k": k}
            if mode == "adapters":
                overrides["adapter_size"] = size
            yield overrides


def run_name(overrides: dict[str, Any]) -> str:
    mode = overrides["mode"]
    detail = {"adapters": f"m{overrides.get('adapter_size')}", "top_k": f"k{overrides['top_k']}"}.get(mode, "")
    return "-".join(
        part
        for part in (mode, detail, f"lr{overrides['learning_rate']:g}", f"ep{overrides['num_epochs']}",
                     f"seed{overrides['seed']}")
        if part
    )


def best_run(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the highest dev score (the task's main metric); ties go to the earlier run."""
    return max(results, key=lambda r: r["score"], default=None)


def sweep(
    base_config,
    workdir: epath.PathLike,
    runs: Sequence[dict[str, Any]],
    train_fn: Callable[[Any, epath.Path], dict[str, Any]] = train.train_and_evaluate,
    predict_test: bool = False,
) -> list[dict[str, Any]]:
    """Runs (or skips, or resumes) each run; returns every finished run's result, in grid order.

    With `predict_test`, each finished run also writes its GLUE test predictions (<run>/submission/),
    which scripts.report gathers into a submission folder for the best runs.
    """
    workdir = epath.Path(workdir)
    with run_utils.WorkdirLock(workdir):
        return _sweep(base_config, workdir, runs, train_fn, predict_test)


def _sweep(
    base_config,
    workdir: epath.Path,
    runs: Sequence[dict[str, Any]],
    train_fn: Callable[[Any, epath.Path], dict[str, Any]],
    predict_test: bool,
) -> list[dict[str, Any]]:
    import jax

    is_primary = jax.process_index() == 0  # every host of a pod runs the sweep; one writes its files
    results, failures = [], []
    for overrides in runs:
        run_dir = workdir / run_name(overrides)
        summary_file, failure_file = run_dir / train.SUMMARY_FILE, run_dir / "failure.json"
        if summary_file.exists():
            logging.info("Skipping finished run %s.", run_dir)
            summary = run_utils.read_json(summary_file)
        elif failure_file.exists():  # a diverged run diverges again: same seed, same data
            failures.append(run_utils.read_json(failure_file))
            continue
        else:
            try:
                summary = train_fn(config_for(base_config, overrides), run_dir)
            except NonFiniteLoss as e:
                failure = {"workdir": str(run_dir), **overrides, "error": str(e)}
                if is_primary:
                    run_utils.write_atomic(failure_file, json.dumps(failure))
                failures.append(failure)
                logging.warning("Run %s diverged: %s", run_dir, e)
                continue
        result = {**summary, "workdir": str(run_dir), "source": "adapter-jax"}
        if predict_test:
            submission_dir = run_dir / submission.SUBMISSION_DIR
            # Written last by predict: without it, a file may be missing (a sweep stopped between two).
            if not (submission_dir / submission.COMPLETE_FILE).exists():
                predict.predict(config_for(base_config, overrides), run_dir)
            result["test_predictions_dir"] = str(submission_dir)
        results.append(result)
        if is_primary:
            _write_jsonl(workdir / RESULTS_FILE, results)
    if is_primary:
        _write_jsonl(workdir / RESULTS_FILE, results)
        _write_jsonl(workdir / FAILURES_FILE, failures)
    return results


def config_for(base_config, overrides: dict[str, Any]):
    config = base_config.copy_and_resolve_references()
    config.update(overrides)
    return config


def _write_jsonl(path: epath.Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewritten whole from the runs' own summaries, so it never duplicates; atomically, so a kill cannot
    empty it."""
    run_utils.write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def main(argv: list[str]) -> None:
    del argv
    import jax

    run_utils.route_logs(run_utils.log_file_for(FLAGS.workdir))
    try:
        distributed.initialize_from_flags()
    except ConfigError as e:
        raise app.UsageError(str(e)) from e

    runs = list(
        grid(
            FLAGS.modes,
            [float(lr) for lr in FLAGS.learning_rates],
            [int(e) for e in FLAGS.epochs],
            [int(m) for m in FLAGS.adapter_sizes],
            [int(s) for s in FLAGS.seeds],
            [int(k) for k in FLAGS.top_k],
        )
    )
    logging.info("Sweep of %d runs into %s", len(runs), FLAGS.workdir)
    run_utils.make_config_paths_absolute(FLAGS.config)
    try:
        results = sweep(FLAGS.config, FLAGS.workdir, runs, predict_test=FLAGS.predict_test)
    except (Preempted, KeyboardInterrupt) as e:
        # A signal during training stops the trainer (Preempted, its checkpoint written); between runs
        # Ctrl-C is Python's KeyboardInterrupt. Either way a rerun skips what is finished.
        signum = e.signum if isinstance(e, Preempted) else signal.SIGINT
        print(f"sweep stopped by {signal.Signals(signum).name}; rerun to continue where it stopped:\n"
              f"  {shlex.join([sys.executable, '-m', 'scripts.sweep', *sys.argv[1:]])}", file=run_utils.console())
        sys.exit(128 + signum)
    except (AdapterJaxError, PeerLost, WriteFailed) as e:
        print(f"error: {e}", file=run_utils.console())
        sys.exit(2 if isinstance(e, AdapterJaxError) else 1)
    if jax.process_index() != 0:
        return
    best = {mode: best_run([r for r in results if r["mode"] == mode]) for mode in FLAGS.modes}
    run_utils.write_atomic(epath.Path(FLAGS.workdir) / "best.json", json.dumps(best, indent=2))
    for mode, run in best.items():
        if run:
            print(f"best {mode}: {run['main_metric']} {run['score']:.4f} ({run['workdir']})")


if __name__ == "__main__":
    app.run(main)
