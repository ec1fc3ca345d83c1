"""Issues 13's and 22's tables, row by row: what a hostile but realistic user does, through the real entry points.

Each test runs `python -m adapter_jax.main` or `scripts.sweep` / `scripts.report` in a subprocess on the tiny
model and toy RTE data; faults (a full disk, a kill at the worst moment) are injected into that process.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from adapter_jax import history
from adapter_jax.workdir import Workdir

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the entry points in subprocesses
CONFIG = f"--config={REPO_ROOT / 'configs' / 'glue.py'}:rte"
# 8 steps per epoch; with 4 steps a run checkpoints at 2 and 4 and exports once, at its end.
RUN = {
    "max_seq_length": 32, "buckets": "(32,)", "global_batch_size": 8, "eval_batch_size": 8, "adapter_size": 8,
    "num_train_steps": 4, "log_every_steps": 1, "checkpoint_every_steps": 2, "checkpoints_to_keep": 3,
}
# Wraps an entry point (argv[1]: a module) with faults chosen by environment variables:
# SLOW_STEPS (seconds per training batch), KILL_ON_TRUNCATE (SIGKILL right after metrics.jsonl is opened
# for rewriting), FSIZE_LIMIT (bytes: larger files cannot be written, as on a full disk),
# INTERRUPT_AFTER_SUBMISSION (Ctrl-C right after a submission file is written), FAIL_AT (module:function, which
# raises RuntimeError("injected failure"): an error no handler expects), EVAL_ROW_LIMIT (a batch of more rows
# fails, as it would under a memory cap); WRITES_LOG (not a fault: the file where each path the process opens for
# writing, or renames into place, is recorded).
FAULTY = r"""
import builtins, os, resource, runpy, signal, sys, time
if os.environ.get("WRITES_LOG"):
    writes = open(os.environ["WRITES_LOG"], "a", buffering=1)
    def record(event, args):
        if event == "open" and isinstance(args[0], str) and isinstance(args[1], str) and set(args[1]) & set("wax+"):
            writes.write(args[0] + "\n")
        elif event == "os.rename":
            writes.write(os.fspath(args[1]) + "\n")
    sys.addaudithook(record)
if os.environ.get("SLOW_STEPS"):
    from adapter_jax import input_pipeline
    next_batch = input_pipeline.TrainIterator.__next__
    delay = float(os.environ["SLOW_STEPS"])
    input_pipeline.TrainIterator.__next__ = lambda self: (time.sleep(delay), next_batch(self))[1]
if os.environ.get("KILL_ON_TRUNCATE"):
    real_open = builtins.open
    def killing_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file).endswith("metrics.jsonl") and "w" in mode:
            os.kill(os.getpid(), signal.SIGKILL)
        return handle
    builtins.open = killing_open
if os.environ.get("FSIZE_LIMIT"):
    limit = int(os.environ["FSIZE_LIMIT"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG
if os.environ.get("INTERRUPT_AFTER_SUBMISSION"):
    from adapter_jax import submission
    write = submission.write_submission
    def interrupted(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt
    submission.write_submission = interrupted
if os.environ.get("FAIL_AT"):
    import importlib
    module_name, _, function = os.environ["FAIL_AT"].partition(":")
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")
    setattr(importlib.import_module(module_name), function, fail)
if os.environ.get("EVAL_ROW_LIMIT"):
    from adapter_jax import input_pipeline
    make_batch, row_limit = input_pipeline._make_batch, int(os.environ["EVAL_ROW_LIMIT"])
    def limited(dataset, rows, *args):
        if len(rows) > row_limit:
            raise MemoryError(f"a batch of {len(rows)} rows")
        return make_batch(dataset, rows, *args)
    input_pipeline._make_batch = limited
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _command(module, workdir, model_dir, glue_dir, *extra, run=RUN):
    command = [sys.executable, "-c", FAULTY, module, CONFIG, f"--workdir={workdir}",
               f"--config.model={model_dir}", f"--config.glue_dir={glue_dir}"]
    return command + [f"--config.{key}={value}" for key, value in run.items()] + list(extra)


def _env(**faults):
    # The same device count and compilation cache as the tests (conftest); the worktree's package whatever the
    # current folder. A process that cannot write large files would leave half-written entries in the cache.
    no_cache = {"JAX_ENABLE_COMPILATION_CACHE": "false"} if "FSIZE_LIMIT" in faults else {}
    return {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"], "PYTHONPATH": str(REPO_ROOT), **no_cache,
            **{key: str(value) for key, value in faults.items()}}


def _run(command, cwd=REPO_ROOT, **faults) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_env(**faults), capture_output=True, text=True, timeout=600,
                          check=False)


def _start(command, log_path, cwd=REPO_ROOT, **faults) -> subprocess.Popen:
    with open(log_path, "w") as log:  # a pipe nobody reads while the test polls would fill and stall the run
        process = subprocess.Popen(command, cwd=cwd, env=_env(**faults), stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


def _wait_for(condition, process, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.log_path.read_text()
        if condition():
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"timed out; output:\n{process.log_path.read_text()}")


def _logged_steps(workdir) -> list[int]:
    text = (workdir / "metrics.jsonl").read_text() if (workdir / "metrics.jsonl").exists() else ""
    return [int(m) for m in re.findall(r'"step": (\d+), "train/loss"', text)]


# The project's own progress lines on the console: time, then the message.
OWN_LINE = re.compile(r"\d\d:\d\d:\d\d (Full log: |JAX devices: |step \d+ dev |Resumed from )")


def _console(stderr: str) -> list[str]:
    """The console's lines, less the progress bar and the project's own progress lines."""
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    return [line for line in lines if not line.startswith("rte:") and not OWN_LINE.match(line)]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_glue_dir, tmp_path_factory):
    """A 4-step run started with a relative workdir (from its parent folder) over a stale lock of a dead process."""
    parent = tmp_path_factory.mktemp("cwd")
    workdir = parent / "runs" / "rte"
    workdir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "yesterday", "token": "x"}
    Workdir(workdir).lock.write_text(json.dumps(stale))
    run = _run(_command("adapter_jax.main", "runs/rte", tiny_model_dir, tiny_glue_dir), cwd=parent)
    return workdir, run


# --- `--workdir=runs/rte` (any relative path); `--workdir=` -------------------------------------------


def test_a_relative_workdir_is_made_absolute_and_an_empty_one_is_a_usage_error(finished_run, tmp_path):
    workdir, run = finished_run
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (workdir / "export" / "adapters.safetensors").exists() and (workdir / "summary.json").exists()
    # The stale lock was taken over with a warning, and the run's own lock is gone.
    assert re.search(rf"Taking over {re.escape(str(workdir))}/lock.json from process \d+ on .* no longer running",
                     run.stderr)
    assert not Workdir(workdir).lock.exists()

    empty = subprocess.run([sys.executable, "-m", "adapter_jax.main", CONFIG, "--workdir="], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert empty.returncode == 2
    assert "error: flag --workdir=: must not be empty" in empty.stderr
    assert list(tmp_path.iterdir()) == []
    sweep = subprocess.run([sys.executable, "-m", "scripts.sweep", CONFIG, "--workdir="], cwd=REPO_ROOT,
                           env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert sweep.returncode != 0 and "--workdir=: must not be empty" in sweep.stderr


# --- Two runs started on the same workdir -------------------------------------------------------------------


def test_a_second_run_on_a_busy_workdir_stops_at_once_naming_the_holder(tiny_model_dir, tiny_glue_dir, tmp_path):
    first = _start(_command("adapter_jax.main", tmp_path / "run", tiny_model_dir, tiny_glue_dir),
                   tmp_path / "first.log", SLOW_STEPS=0.5)
    lock = Workdir(tmp_path / "run").lock
    _wait_for(lock.exists, first)
    second = _run(_command("adapter_jax.main", tmp_path / "run", tiny_model_dir, tiny_glue_dir))
    assert second.returncode == 2, second.stderr
    assert len(_console(second.stderr)) == 1, second.stderr
    assert re.search(rf"error: {tmp_path / 'run'} is in use by process {first.pid} on {socket.gethostname()} "
                     r"\(started .*\)", second.stderr), second.stderr
    first.wait(timeout=300)
    assert first.returncode == 0, first.log_path.read_text()
    assert _logged_steps(tmp_path / "run") == [1, 2, 3, 4]


# --- A sweep stopped between two submission files; Ctrl-C on the sweep --------------------------------------


def test_a_sweep_stopped_by_ctrl_c_exits_130_and_redoes_a_partial_submission(tiny_model_dir, tiny_glue_dir, tmp_path):
    grid = ["--modes=adapters", "--learning_rates=0.01", "--epochs=1", "--adapter_sizes=8", "--seeds=0"]
    command = _command("scripts.sweep", tmp_path / "sweep", tiny_model_dir, tiny_glue_dir, *grid)
    sweep = _start(command, tmp_path / "first.log", SLOW_STEPS=0.5)
    run_dir = tmp_path / "sweep" / "adapters-m8-lr0.01-ep1-seed0"
    _wait_for(lambda: _logged_steps(run_dir)[-1:] >= [2], sweep)
    sweep.send_signal(signal.SIGINT)
    sweep.wait(timeout=120)
    output = sweep.log_path.read_text()
    assert sweep.returncode == 130, output
    assert "Traceback" not in output
    assert f"rerun to continue where it stopped:\n  {sys.executable} -m scripts.sweep" in output

    # Ctrl-C between the submission file and the record of its completion.
    interrupted = _run(command, INTERRUPT_AFTER_SUBMISSION=1)
    assert interrupted.returncode == 130, interrupted.stderr
    assert (run_dir / "submission" / "RTE.tsv").exists()
    assert not (run_dir / "submission" / "complete.json").exists()

    # The rerun does not count the run as done: it predicts again, and records completion last.
    (run_dir / "submission" / "RTE.tsv").unlink()
    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((run_dir / "submission" / "complete.json").read_text()) == {"files": ["RTE.tsv"]}
    assert (run_dir / "submission" / "RTE.tsv").exists()
    (result,) = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]

    # report.py refuses a run whose predictions lack a file.
    (run_dir / "submission" / "RTE.tsv").unlink()
    report = subprocess.run(
        [sys.executable, "-m", "scripts.report", f"--results={tmp_path / 'sweep' / 'results.jsonl'}",
         f"--out_dir={tmp_path / 'report'}", f"--submission_dir={tmp_path / 'upload'}"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert report.returncode == 2
    assert f"error: rte: {result['test_predictions_dir']} lacks ['RTE.tsv']" in report.stderr
    assert "Traceback" not in report.stderr


# --- SIGKILL while metrics.jsonl is rewritten; SIGKILL right after a checkpoint folder appears ---------------


def test_the_history_is_appended_so_a_kill_at_any_write_leaves_it_whole(tiny_model_dir, tiny_glue_dir, tmp_path):
    run = _run(_command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir), KILL_ON_TRUNCATE=1)
    assert run.returncode == 0, run.stderr  # metrics.jsonl is never opened for rewriting, so never killed there
    assert _logged_steps(tmp_path) == [1, 2, 3, 4]


def test_a_resumed_run_drops_the_history_past_its_checkpoint_and_a_broken_last_line(
    tiny_model_dir, tiny_glue_dir, tmp_path
):
    run = {**RUN, "num_train_steps": 6, "checkpoint_every_steps": 4}
    process = _start(_command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir, run=run),
                     tmp_path.parent / f"{tmp_path.name}.log", SLOW_STEPS=0.3)
    _wait_for(lambda: _logged_steps(tmp_path)[-1:] >= [5], process)
    process.kill()
    process.wait()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut short by the kill
    rerun = _run(_command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir, run=run))
    assert rerun.returncode == 0, rerun.stderr
    assert "Resumed from" in rerun.stderr and "at step 4." in rerun.stderr
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "dev/accuracy" in r] == [6]


# --- A workdir with history but no checkpoint, rerun with another config ------------------------------------


def test_a_workdir_whose_history_has_another_config_is_refused(finished_run, tiny_model_dir, tiny_glue_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir, ignore=shutil.ignore_patterns("checkpoints"))
    history = (workdir / "metrics.jsonl").read_text()
    rerun = _run(_command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, "--config.learning_rate=0.5"))
    assert rerun.returncode == 2, rerun.stderr
    assert f"workdir: {workdir} holds a run with another config" in rerun.stderr
    assert "learning_rate: history has 0.0003, config has 0.5" in rerun.stderr
    assert (workdir / "metrics.jsonl").read_text() == history


# --- Disk full during a checkpoint save, during the export --------------------------------------------------


@pytest.mark.parametrize("what", ["checkpoint", "export"])
def test_a_full_disk_stops_the_run_with_one_error_line_and_no_temporary_files(
    tiny_model_dir, tiny_glue_dir, tmp_path, what
):
    # Full fine-tuning: checkpoints and the export hold the 1M-parameter embeddings, the only large files.
    # The save of step 2 fails in the background; slow steps give it the time to fail before the export at 6.
    run = {**RUN, "num_train_steps": 6, "checkpoint_every_steps": 2 if what == "checkpoint" else 100}
    command = _command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir, "--config.mode=full", run=run)
    result = _run(command, FSIZE_LIMIT=1_000_000, SLOW_STEPS=1 if what == "checkpoint" else 0)
    assert result.returncode == 1, result.stderr
    assert len(_console(result.stderr)) == 1, _console(result.stderr)
    (line,) = _console(result.stderr)
    target = tmp_path / ("checkpoints" if what == "checkpoint" else "export/adapters.safetensors")
    assert line == f"error: cannot write {'a checkpoint to ' if what == 'checkpoint' else ''}{target}: File too large"
    leftovers = [p for p in tmp_path.rglob("*") if "tmp" in p.name]
    assert leftovers == []
    assert not (tmp_path / "summary.json").exists() and not Workdir(tmp_path).lock.exists()


# --- Truncated data of the latest checkpoint -----------------------------------------------------------------


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tiny_model_dir, tiny_glue_dir,
                                                                   tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    (workdir / "summary.json").unlink()
    for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rerun = _run(_command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir))
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(r"cannot read the state of checkpoint step 4 in .*; falling back to step 2", rerun.stderr)
    assert "Resumed from" in rerun.stderr and "at step 2." in rerun.stderr
    assert "Traceback" not in rerun.stderr and "Event loop is closed" not in rerun.stderr
    assert [p.name.split("-")[0] for p in (workdir / "corrupt_checkpoints").iterdir()] == ["4"]
    assert (workdir / "summary.json").exists()


# --- `--config=configs/glue.py:wnli --mode=predict` on an RTE workdir ------------------------------------------


def test_predict_refuses_an_export_of_another_task(finished_run, tiny_model_dir, tiny_glue_dir):
    workdir = finished_run[0]
    command = _command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, "--mode=predict")
    command[command.index(CONFIG)] = CONFIG.replace(":rte", ":wnli")
    result = _run(command)
    assert result.returncode == 2, result.stderr
    assert (f"error: the adapter export in {workdir / 'export'} was trained for rte, but the config names wnli"
            in result.stderr)
    assert not (workdir / "submission").exists()


# --- An export with incomplete metadata; an invalid summary.json in a sweep ----------------------------------


def test_malformed_files_read_back_are_named(finished_run, tiny_model_dir, tiny_glue_dir, tmp_path):
    from adapter_jax import export

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    params, settings = export.read_raw(workdir / "export")
    del settings["mode"]
    export.write(workdir / "export", params, settings)
    result = _run(_command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, "--mode=predict"))
    assert result.returncode == 2, result.stderr
    assert f"error: adapter export {workdir / 'export' / 'adapters.safetensors'} lacks the settings ['mode']" in (
        result.stderr)

    run_dir = tmp_path / "sweep" / "adapters-m8-lr0.01-ep1-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"task": "rte", ')
    grid = ["--modes=adapters", "--learning_rates=0.01", "--epochs=1", "--adapter_sizes=8", "--seeds=0"]
    sweep = _run(_command("scripts.sweep", tmp_path / "sweep", tiny_model_dir, tiny_glue_dir, *grid))
    assert sweep.returncode == 2, sweep.stderr
    assert f"error: {run_dir / 'summary.json'} is not valid JSON" in sweep.stderr
    assert "Traceback" not in sweep.stderr


def test_on_a_bucket_the_history_is_chunks_cut_back_on_resume(tmp_path, monkeypatch):
    """An object store cannot append: each flush adds an object, and a resume rewrites at most one chunk."""
    monkeypatch.setattr(history, "is_remote", lambda path: True)  # local files, the object-store layout
    writer = history.HistoryWriter(tmp_path, resumed_step=0)
    for step in (1, 2):
        writer.write(step, {"train/loss": 1.0})
    writer.flush()
    for step in (3, 4):
        writer.write(step, {"train/loss": 1.0})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["000000.jsonl", "000001.jsonl"]
    assert [r["step"] for r in history.read_history(tmp_path)] == [1, 2, 3, 4]

    resumed = history.HistoryWriter(tmp_path, resumed_step=3)
    assert [r["step"] for r in history.read_history(tmp_path)] == [1, 2, 3]
    resumed.write(4, {"train/loss": 2.0})
    resumed.close()
    assert [(r["step"], r["train/loss"]) for r in history.read_history(tmp_path)] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0)]
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]


# --- Issue 22 ----------------------------------------------------------------------------------------------------


def _faulty(module, *args) -> list[str]:
    return [sys.executable, "-c", FAULTY, module, *map(str, args)]


def _error_line(result) -> str:
    """The process's last console line, its one `error:` line, without a traceback: asserted so."""
    lines = _console(result.stderr)
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


# --- An exception no handler expects, in every entry point ---------------------------------------------------------


@pytest.mark.parametrize("module, fail_at, args", [
    ("adapter_jax.main", "adapter_jax.train:train_and_evaluate", "workdir"),
    ("scripts.sweep", "adapter_jax.train:train_and_evaluate", "workdir"),
    ("adapter_jax.serve", "adapter_jax.export:read", "serve"),
    ("scripts.ablate", "adapter_jax.export:load", "ablate"),
    ("scripts.report", "adapter_jax.selection:best_runs", "report"),
])
def test_an_unexpected_error_is_one_line_naming_the_file_with_its_traceback(
    tiny_model_dir, tiny_glue_dir, tmp_path, module, fail_at, args
):
    if args == "workdir":
        grid = ["--learning_rates=0.01", "--epochs=1", "--adapter_sizes=8", "--seeds=0"] if "sweep" in module else []
        command = _command(module, tmp_path / "run", tiny_model_dir, tiny_glue_dir, *grid)
    elif args == "serve":
        command = _faulty(module, f"--adapters=rte={tmp_path}", f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}")
    elif args == "ablate":
        command = _faulty(module, f"--workdir={tmp_path}", f"--config.model={tiny_model_dir}")
    else:
        (tmp_path / "results.jsonl").write_text(json.dumps({"task": "rte", "mode": "full", "score": 0.5}) + "\n")
        command = _faulty(module, f"--results={tmp_path / 'results.jsonl'}", f"--out_dir={tmp_path / 'report'}")
    result = _run(command, FAIL_AT=fail_at)
    assert result.returncode == 1, result.stderr
    match = re.fullmatch(r"error: RuntimeError: injected failure \(traceback in (.+)\)", _error_line(result))
    assert match, result.stderr
    traceback = pathlib.Path(match[1]).read_text()
    assert "Traceback (most recent call last)" in traceback and "RuntimeError: injected failure" in traceback
    if args == "workdir":  # the run's own log file
        assert pathlib.Path(match[1]).parent == tmp_path / "run" / "logs"


# --- `--workdir` a file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["adapter_jax.main", "scripts.sweep"])
def test_a_workdir_that_is_a_file_is_one_usage_error(tiny_model_dir, tiny_glue_dir, tmp_path, module):
    (tmp_path / "file").write_text("not a folder")
    result = _run(_command(module, tmp_path / "file", tiny_model_dir, tiny_glue_dir))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"error: --workdir: cannot write the log file {tmp_path / 'file' / 'logs'}/"), result.stderr
    assert result.stderr.splitlines()[0].endswith(": Not a directory")


# --- `--config.max_seq_length=1` -----------------------------------------------------------------------------------


def test_a_max_seq_length_too_short_for_cls_text_sep_is_refused(tiny_model_dir, tiny_glue_dir, tmp_path):
    result = _run(_command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir, "--config.max_seq_length=1"))
    assert result.returncode == 2, result.stderr
    assert "max_seq_length: 1 is too short for rte's [CLS] a [SEP] b [SEP]: at least 5" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "metrics.jsonl").exists()


# --- `eval_batch_size=16384` on a small dev set; an export whose metadata has `"max_seq_length": "128"` -----------


def test_an_eval_batch_far_beyond_the_data_is_cut_to_fit(finished_run, tiny_model_dir, tiny_glue_dir, tmp_path):
    """24 dev and 20 test examples on 2 devices: each shard's 12 rows padded to 16, never to 16384 / 2."""
    workdir = shutil.copytree(finished_run[0], tmp_path / "run")
    command = _command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, "--mode=predict",
                       "--config.eval_batch_size=16384")
    result = _run(command, EVAL_ROW_LIMIT=32)
    assert result.returncode == 0, result.stderr
    assert len((workdir / "submission" / "RTE.tsv").read_text().splitlines()) == 1 + 20
    summary = json.loads((workdir / "summary.json").read_text())
    assert json.loads(result.stdout)["dev_metrics"]["dev"] == summary["all_dev_metrics"]["dev"]


def test_export_settings_of_the_wrong_type_are_one_line_naming_key_and_file(finished_run, tiny_model_dir,
                                                                            tiny_glue_dir, tmp_path):
    from adapter_jax import export

    workdir = shutil.copytree(finished_run[0], tmp_path / "run")
    params, settings = export.read_raw(workdir / "export")
    export.write(workdir / "export", params, {**settings, "max_seq_length": "128"})
    result = _run(_command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, "--mode=predict"))
    assert result.returncode == 2, result.stderr
    assert _error_line(result) == (
        f"error: adapter export {workdir / 'export' / 'adapters.safetensors'} has settings of the wrong type in its "
        f"'adapter_jax' metadata: max_seq_length: '128' is not allowed (must be a positive integer)")


# --- One corrupted line in the middle of metrics.jsonl, then resume ------------------------------------------------


def test_a_damaged_history_line_is_set_aside_and_named_not_the_place_to_cut(finished_run, tiny_model_dir,
                                                                             tiny_glue_dir, tmp_path):
    workdir = shutil.copytree(finished_run[0], tmp_path / "run")
    (workdir / "summary.json").unlink()
    shutil.rmtree(workdir / "checkpoints" / "4")  # resumes at step 2
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[0] = '{"step": 1, "train/loss": 0.\x00\n'
    (workdir / "metrics.jsonl").write_text("".join(lines))
    rerun = _run(_command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir))
    assert rerun.returncode == 0, rerun.stderr
    assert "at step 2." in rerun.stderr
    history_file = workdir / "metrics.jsonl"
    assert re.search(rf"{re.escape(str(history_file))}: damaged line\(s\) 1 \(not whole JSON records\) set aside in "
                     rf"{re.escape(str(workdir / 'metrics.damaged.txt'))}", rerun.stderr), rerun.stderr
    assert [r["step"] for r in history.read_history(workdir) if "train/loss" in r] == [2, 3, 4]
    assert lines[0] in (workdir / "metrics.damaged.txt").read_text()


# --- A sweep rerun with another grid; one run folder whose config conflicts -----------------------------------------


def test_a_sweep_keeps_every_finished_run_and_goes_on_past_a_run_that_cannot_start(tiny_model_dir, tiny_glue_dir,
                                                                                   tmp_path):
    folder = tmp_path / "sweep"

    def sweep(*learning_rates):
        grid = [f"--learning_rates={','.join(learning_rates)}", "--epochs=1", "--adapter_sizes=8", "--seeds=0",
                "--predict_test=none"]
        return _run(_command("scripts.sweep", folder, tiny_model_dir, tiny_glue_dir, *grid))

    first = sweep("0.01")
    assert first.returncode == 0, first.stderr
    # A folder of the next grid holds the history of another config (the first run's learning rate).
    conflicting = folder / "adapters-m8-lr0.02-ep1-seed0"
    conflicting.mkdir()
    shutil.copy(folder / "adapters-m8-lr0.01-ep1-seed0" / "config.json", conflicting / "config.json")
    second = sweep("0.02", "0.03")
    assert second.returncode == 0, second.stderr
    assert re.search(rf"Run {conflicting} could not start, going on with the next: invalid config", second.stderr)
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["learning_rate"] for r in results] == [0.01, 0.03]
    (failure,) = [json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()]
    assert failure["workdir"] == str(conflicting) and "holds a run with another config" in failure["error"]
    assert not (conflicting / "failure.json").exists()  # a rerun tries it again once the folder is fixed
    best = json.loads((folder / "best.json").read_text())["adapters"]
    assert best["score"] == max(r["score"] for r in results)


# --- scripts.report on malformed inputs; scripts.ablate without an export, or --replot of the wrong shape -----------


GOOD_RESULT = json.dumps({"task": "rte", "mode": "full", "score": 0.5})


@pytest.mark.parametrize("line, message", [
    ("5", "not a JSON object of a run's result: 5"),
    ("null", "not a JSON object of a run's result: null"),
    ('{"task": "rte", "mode": "adapters", "score": 0.5}', "an adapters run without its adapter_size"),
    ('{"task": 5, "mode": "full", "score": 0.5}', "task must be a string, got 5"),
    (b"\xff", "not UTF-8 text (invalid start byte at byte 0)"),
])
def test_report_names_the_file_and_line_of_a_malformed_result(tmp_path, line, message):
    results = tmp_path / "results.jsonl"
    results.write_bytes(GOOD_RESULT.encode() + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    result = _run(_faulty("scripts.report", f"--results={results}", f"--out_dir={tmp_path / 'out'}"))
    assert result.returncode == 2, result.stderr
    assert _error_line(result) == f"error: {results}:2: {message}"


def test_report_and_ablate_name_what_they_cannot_use(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(GOOD_RESULT + "\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    report = _run(_faulty("scripts.report", f"--results={results}", f"--out_dir={blocked}"))
    assert report.returncode == 2, report.stderr
    assert _error_line(report) == f"error: cannot write {blocked}: File exists"

    no_export = _run(_faulty("scripts.ablate", f"--workdir={tmp_path}"))
    assert no_export.returncode == 2, no_export.stderr
    assert _error_line(no_export) == f"error: adapter export not found: {tmp_path / 'export'}"
    for content, message in [("[1, 2]", ("not an ablation results file: it lacks ['task', 'split', 'metric', "
                                        "'num_layers', 'unablated', 'majority', 'spans']")),
                             (json.dumps({"task": "rte", "split": "dev", "metric": "accuracy", "num_layers": 2,
                                          "unablated": 0.6, "majority": 0.5,
                                          "spans": [{"first": 0, "last": 2, "score": 0.5}]}),
                              "spans[0] is not a span of layers 0..1 with a score")]:
        (tmp_path / "ablation.json").write_text(content)
        replot = _run(_faulty("scripts.ablate", f"--replot={tmp_path / 'ablation.json'}"))
        assert replot.returncode == 2, replot.stderr
        assert _error_line(replot) == f"error: {tmp_path / 'ablation.json'}: {message}"
