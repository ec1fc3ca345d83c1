"""The paper's hyperparameter sweep for one task, resumable, with one results file.

Runs every point of (mode x learning rate x epochs x adapter size x seed), each in its own workdir
under --workdir; finished runs (a summary.json) are skipped and interrupted ones resume from their
checkpoints, so a preempted sweep continues where it stopped when rerun. Every finished run is a
line of <workdir>/results.jsonl, which keeps every run ever finished in that folder, whatever grid a rerun
names; a run that diverged or could not start (a run folder of another config) is a line of failures.jsonl,
and the sweep goes on. The best run on dev per mode is printed and written to best.json. After the grid, the
runs scripts.report selects (the best on dev per task and method) predict their GLUE test sets
(--predict_test=selected; all: every run; none).
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from adapter_jax import cli, distributed, logs, paper, predict, selection, train
from adapter_jax.errors import AdapterJaxError, DataError, NonFiniteLoss, Preempted
from adapter_jax.lock import LEASE_SECONDS, WorkdirLock
from adapter_jax.results import RunResult
from adapter_jax.workdir import (
    SweepDir,
    Workdir,
    is_primary_process,
    read_json,
    write_atomic,
    write_shared,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/glue.py:rte; --config.KEY overrides.")
cli.define_path_flag("workdir", None, "Root folder: one sub-folder per run, results.jsonl, best.json.")
flags.DEFINE_list("modes", ["adapters"], "Values of config.mode to run: adapters, full, top_k, layernorm.")
flags.DEFINE_list("learning_rates", [str(lr) for lr in paper.LEARNING_RATES], "Learning rates.")
flags.DEFINE_list("epochs", [str(e) for e in paper.EPOCHS], "Epoch counts.")
flags.DEFINE_list("adapter_sizes", [str(m) for m in paper.ADAPTER_SIZES], "Adapter sizes (adapters mode only).")
flags.DEFINE_list("seeds", [str(s) for s in range(paper.NUM_SEEDS)], "Seeds; the paper takes the best on dev.")
flags.DEFINE_list("top_k", ["1"], "Layers fine-tuned in top_k mode.")
PREDICT_CHOICES = ("selected", "all", "none")
flags.DEFINE_enum("predict_test", "selected", PREDICT_CHOICES,
                  "After the grid, write GLUE test predictions (for scripts.report's submission) of the runs the "
                  "report selects (the best on dev per task and method), of every run, or of none.")
flags.DEFINE_integer("lock_lease_seconds", None, "The lease of the sweep's lock and its runs' locks (see "
                     "lock.py); default: --config.lock_lease_seconds (120).", lower_bound=1)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


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
    predict_test: str = "none",
) -> list[dict[str, Any]]:
    """Runs (or skips, or resumes) each run; returns the finished runs' results, in grid order.

    results.jsonl and failures.jsonl gain this grid's runs and keep those of earlier grids. Then, per
    `predict_test` (one of PREDICT_CHOICES), the runs scripts.report selects among all finished runs, or all of
    them, write their GLUE test predictions (<run>/submission/), which scripts.report gathers.
    """
    if predict_test not in PREDICT_CHOICES:
        raise ValueError(f"predict_test must be one of {PREDICT_CHOICES}, not {predict_test!r}")
    folder = SweepDir(workdir)
    with WorkdirLock(folder.path, base_config.get("lock_lease_seconds", LEASE_SECONDS)):
        records = Records(folder)
        results = _sweep(base_config, folder, runs, train_fn, records)
        if predict_test != "none":
            _predict(base_config, folder, records, select=predict_test == "selected")
        return results


class Records:
    """The sweep folder's results.jsonl and failures.jsonl, by run folder: read once (process 0 alone: the
    files are its own), updated run by run and written whole after each, so a kill loses no finished run."""

    def __init__(self, folder: SweepDir):
        self._folder = folder
        primary = is_primary_process()
        self.results = _read_jsonl(folder.results) if primary and folder.results.exists() else {}
        self.failures = _read_jsonl(folder.failures) if primary and folder.failures.exists() else {}

    def finished(self, result: dict[str, Any]) -> None:
        self.results[result["workdir"]] = result
        self.failures.pop(result["workdir"], None)

    def failed(self, failure: dict[str, Any]) -> None:
        self.failures[failure["workdir"]] = failure

    def write(self) -> None:
        _write_jsonl(self._folder.results, list(self.results.values()))
        _write_jsonl(self._folder.failures, list(self.failures.values()))


def _sweep(
    base_config,
    folder: SweepDir,
    runs: Sequence[dict[str, Any]],
    train_fn: Callable[[Any, epath.Path], dict[str, Any]],
    records: Records,
) -> list[dict[str, Any]]:
    results = []
    for overrides in runs:
        run = folder.run(run_name(overrides))
        state, record = run_state(run)
        if state == "failed":  # a diverged run diverges again: same seed, same data
            records.failed(record)
            continue
        if state == "finished":
            logging.info("Skipping finished run %s.", run)
            summary = record
        else:
            try:
                summary = train_fn(config_for(base_config, overrides), run.path)
            except NonFiniteLoss as e:
                failure = {"workdir": str(run), **overrides, "error": str(e)}
                write_shared(run.failure, json.dumps(failure))
                records.failed(failure)
                logging.warning("Run %s diverged: %s", run, e)
                continue
            except AdapterJaxError as e:  # no failure.json: once the cause is fixed, a rerun runs it
                records.failed({"workdir": str(run), **overrides, "error": f"could not start: {e}"})
                records.write()
                logging.warning("Run %s could not start, going on with the next: %s", run, e)
                continue
        result = {**summary, "workdir": str(run), "source": "adapter-jax"}
        results.append(result)
        records.finished(result)
        records.write()
    records.write()
    return results


def _predict(base_config, folder: SweepDir, records: Records, *, select: bool) -> None:
    """Predicts the test sets of the runs scripts.report selects among every finished run of the folder (every
    run, unless `select`) where they are not complete yet, and records where they are. Process 0 decides which,
    for all: on a pod the processes predict each run together."""
    plan = []  # [the run's record key, its folder's name, whether it needs predicting]
    if is_primary_process():
        workdirs = [run.workdir for run in _selected(folder, records.results.values())] if select else records.results
        for workdir in workdirs:
            name = epath.Path(workdir).name
            # complete.json, written last by predict: without it, a file may be missing (a sweep stopped between two)
            plan.append([workdir, name, not folder.run(name).submission_complete.exists()])
    for workdir, name, needed in distributed.from_process_0(plan):
        run = folder.run(name)
        if needed:
            predict.predict(base_config, run.path)
        if workdir in records.results:
            records.results[workdir]["test_predictions_dir"] = str(run.submission_dir)
    records.write()


def _selected(folder: SweepDir, results: Iterable[dict[str, Any]]) -> list[RunResult]:
    """The runs scripts.report's table selects: the best on dev per task and method."""
    try:
        runs = [RunResult.from_dict(result) for result in results]
    except DataError as e:
        raise DataError(f"{folder.results}: a run's result {e}") from e
    best = selection.best_runs(runs)
    return list({run.workdir: run for by_task in best.values() for run in by_task.values()}.values())


def run_state(run: Workdir) -> tuple[str, dict | None]:
    """("finished", its summary), ("failed", its failure record) or ("todo", None), as process 0 finds it.

    Every process must skip or train the same runs, together; process 0 alone writes the files that say
    so, and hosts with workdirs of their own (local disks) do not see them: process 0 decides for all.
    """
    state: tuple[str, dict | None] = ("todo", None)
    if is_primary_process():
        if run.summary.exists():
            state = ("finished", read_json(run.summary))
        elif run.failure.exists():
            state = ("failed", read_json(run.failure))
    return tuple(distributed.from_process_0(state))


def config_for(base_config, overrides: dict[str, Any]):
    config = base_config.copy_and_resolve_references()
    config.update(overrides)
    return config


def _read_jsonl(path: epath.Path) -> dict[str, dict[str, Any]]:
    """The records of a results or failures file by run folder; a malformed line raises DataError naming it."""
    records = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e.msg}); fix or delete that line") from e
        if not isinstance(record, dict) or not isinstance(record.get("workdir"), str):
            raise DataError(f"{path}:{number}: not a run's record (a JSON object naming its workdir)")
        records[record["workdir"]] = record
    return records


def _write_jsonl(path: epath.Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewritten whole from the runs' own records, so it never duplicates; atomically, so a kill cannot
    empty it."""
    write_shared(path, "".join(json.dumps(record) + "\n" for record in records))


def main(argv: list[str]) -> None:
    del argv
    cli.start(Workdir(FLAGS.workdir).log_file())
    if FLAGS.lock_lease_seconds is not None:
        FLAGS.config.lock_lease_seconds = FLAGS.lock_lease_seconds
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
    with cli.exit_codes():
        try:
            sweep(FLAGS.config, FLAGS.workdir, runs, predict_test=FLAGS.predict_test)
        except (Preempted, KeyboardInterrupt) as e:
            # A signal during training stops the trainer (Preempted, its checkpoint written); between runs
            # Ctrl-C is Python's KeyboardInterrupt. Either way a rerun skips what is finished.
            signum = e.signum if isinstance(e, Preempted) else signal.SIGINT
            print(f"sweep stopped by {signal.Signals(signum).name}; rerun to continue where it stopped:\n"
                  f"  {shlex.join([sys.executable, '-m', 'scripts.sweep', *sys.argv[1:]])}", file=logs.console())
            sys.exit(128 + signum)
    if not is_primary_process():
        return
    folder = SweepDir(FLAGS.workdir)
    with cli.exit_codes():
        results = list(_read_jsonl(folder.results).values())  # every run of the folder, this grid's or not
        failures = _read_jsonl(folder.failures) if folder.failures.exists() else {}
    modes = dict.fromkeys([*FLAGS.modes, *(r["mode"] for r in results)])
    best = {mode: best_run([r for r in results if r["mode"] == mode]) for mode in modes}
    write_atomic(folder.best, json.dumps(best, indent=2))
    for mode, run in best.items():
        if run:
            print(f"best {mode}: {run['main_metric']} {run['score']:.4f} ({run['workdir']})")
    if failures:
        print(f"{len(failures)} runs diverged or could not start: see {folder.failures}", file=logs.console())


if __name__ == "__main__":
    cli.run(main)
