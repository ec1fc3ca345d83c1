"""Robustness: preemption (SIGTERM, SIGINT, SIGKILL) and resume, divergence, untrusted weight files.

The end-to-end tests run the real entry point in a subprocess, slowed to 0.1 s per training step
so that a signal lands mid-run; every run is compared with one uninterrupted run of the same config.
"""

import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from adapter_jax import checkpoint, errors, input_pipeline, steps, train, weights
from configs import glue

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# 8 steps per epoch, 24 in all; periodic checkpoints at 4, 12, 20 and at each epoch's end (8, 16, 24).
RUN = {
    "max_seq_length": 32,
    "buckets": (32,),  # one shape: one compilation of each step
    "global_batch_size": 8,
    "eval_batch_size": 8,
    "num_epochs": 3,
    "learning_rate": 1e-2,
    "adapter_size": 8,
    "log_every_steps": 1,
    "checkpoint_every_steps": 4,
    "checkpoints_to_keep": 3,
}

# The entry point, with each training batch delayed so that the test can signal it mid-run.
SLOW_MAIN = (
    "import time\n"
    "from adapter_jax import input_pipeline, main\n"
    "next_batch = input_pipeline.TrainIterator.__next__\n"
    "input_pipeline.TrainIterator.__next__ = lambda self: (time.sleep(0.1), next_batch(self))[1]\n"
    "main.run()\n"
)


def _config(model_dir, glue_dir, **overrides):
    config = glue.get_config("rte")
    config.model = str(model_dir)
    config.glue_dir = str(glue_dir)
    for key, value in {**RUN, **overrides}.items():
        config[key] = value
    return config


def _latest(workdir) -> tuple[int, dict]:
    """(step, trainable params) of the latest checkpoint in `workdir`."""
    manager = checkpoint.checkpoint_manager(pathlib.Path(workdir))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state["params"]


def _assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_glue_dir, tmp_path_factory):
    """The final parameters of an uninterrupted run of RUN."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(_config(tiny_model_dir, tiny_glue_dir), workdir)
    step, params = _latest(workdir)
    assert step == 24
    return params


# --- Preemption ---------------------------------------------------------------------------------


def _start(workdir, model_dir, glue_dir) -> subprocess.Popen:
    command = [
        sys.executable, "-c", SLOW_MAIN, "--config=configs/glue.py:rte", f"--workdir={workdir}",
        f"--config.model={model_dir}", f"--config.glue_dir={glue_dir}",
        *(f"--config.{key}={value}" for key, value in RUN.items()),
    ]
    # The same device count as this process (conftest), so every run computes exactly the same.
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"]}
    # Output goes to a file: a pipe nobody reads while the test polls would fill and stall the run.
    log_path = pathlib.Path(workdir) / f"run-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


def _wait_for_step(process: subprocess.Popen, workdir, step: int, timeout: float = 120.0) -> int:
    """Polls metrics.jsonl until the run has logged `step`; returns the last step logged."""
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, _output(process)
        logged = metrics.read_text() if metrics.exists() else ""
        steps = [int(m) for m in re.findall(r'"step": (\d+), "train/loss"', logged)]
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no step {step} in {metrics} after {timeout} s")


def _output(process: subprocess.Popen) -> str:
    return process.log_path.read_text()


def _finish(process: subprocess.Popen, timeout: float = 180.0) -> tuple[int, str]:
    """(exit status, stdout and stderr) of a run."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, _output(process)


def _rerun_resumes_to_the_reference(tmp_path, model_dir, glue_dir, resumed_at: int, reference) -> None:
    """Rerunning the same command resumes at `resumed_at` and ends where the uninterrupted run did."""
    returncode, stderr = _finish(_start(tmp_path, model_dir, glue_dir))
    assert returncode == 0, stderr
    assert re.search(rf"Resumed from .* at step {resumed_at}\.", stderr), stderr
    step, params = _latest(tmp_path)
    assert step == 24
    _assert_same_params(params, reference)


@pytest.mark.slow  # the entry point in a subprocess, and the 24-step reference
def test_sigterm_checkpoints_the_current_step_and_a_rerun_finishes_identically(
    tiny_model_dir, tiny_glue_dir, tmp_path, reference
):
    process = _start(tmp_path, tiny_model_dir, tiny_glue_dir)
    _wait_for_step(process, tmp_path, 5)
    process.send_signal(signal.SIGTERM)
    returncode, stderr = _finish(process)

    assert returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    match = re.search(r"stopped by SIGTERM at step (\d+); checkpoint written to .*Rerun the same command to resume",
                      stderr)
    assert match, stderr
    stopped_at = int(match.group(1))
    assert 5 <= stopped_at < 24  # mid-run, and not necessarily at a periodic checkpoint
    assert _latest(tmp_path)[0] == stopped_at

    _rerun_resumes_to_the_reference(tmp_path, tiny_model_dir, tiny_glue_dir, stopped_at, reference)


@pytest.mark.slow  # the entry point in a subprocess, and the 24-step reference
def test_sigkill_loses_only_the_steps_since_the_last_checkpoint_and_ignores_a_half_written_one(
    tiny_model_dir, tiny_glue_dir, tmp_path, reference
):
    process = _start(tmp_path, tiny_model_dir, tiny_glue_dir)
    killed_after = _wait_for_step(process, tmp_path, 10)
    process.kill()
    process.wait()
    last_saved = _latest(tmp_path)[0]
    assert 4 <= last_saved <= killed_after and last_saved % 4 == 0  # the last periodic checkpoint
    # A save killed while writing leaves orbax's temporary folder behind (this kill may have left one
    # too); it must not count as a checkpoint, nor stop that step from being saved when it comes again.
    half_written = tmp_path / "checkpoints" / f"{last_saved + 4}.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / str(last_saved), half_written, dirs_exist_ok=True)
    for path in half_written.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert _latest(tmp_path)[0] == last_saved

    _rerun_resumes_to_the_reference(tmp_path, tiny_model_dir, tiny_glue_dir, last_saved, reference)
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())


# --- Divergence ---------------------------------------------------------------------------------


def _poison_steps(monkeypatch, first: int, last: int) -> None:
    """Makes the loss and gradient NaN at steps first..last (1-based, as the trainer counts them).

    The step function is traced once, so the choice is made on the traced state.step (steps done
    before this one): a NaN example weight makes the weighted loss, and so every gradient, NaN.
    """
    original = steps.train_step

    def poisoned_step(state, frozen_params, batch, **kwargs):
        poisoned = (state.step + 1 >= first) & (state.step + 1 <= last)
        batch = dict(batch, weight=jnp.where(poisoned, jnp.nan, batch["weight"]))
        return original(state, frozen_params, batch, **kwargs)

    monkeypatch.setattr(steps, "train_step", poisoned_step)


def _record_saves(monkeypatch) -> list[tuple[int, dict]]:
    """Every (step, trainable params) the trainer checkpoints, in order."""
    saves = []
    original = checkpoint.save_checkpoint

    def recording_save(manager, step, state, meta, **kwargs):
        saves.append((step, jax.tree.map(np.copy, state["params"])))
        return original(manager, step, state, meta, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", recording_save)
    return saves


def test_nonfinite_gradient_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, tiny_glue_dir, tmp_path, monkeypatch
):
    # Metrics are read only at checkpoints, so the NaN of step 6 is found at step 8, an epoch's end.
    config = _config(tiny_model_dir, tiny_glue_dir, log_every_steps=50)
    _poison_steps(monkeypatch, first=6, last=24)
    saves = _record_saves(monkeypatch)
    with pytest.raises(errors.NonFiniteLoss, match=r"at step 6 \(loss nan.*last finite loss ([\d.]+)") as info:
        train.train_and_evaluate(config, tmp_path)
    assert "on_nonfinite=skip" in str(info.value)

    assert [step for step, _ in saves] == [4]  # nothing saved, evaluated or exported after the NaN
    assert not (tmp_path / "export").exists()
    step, params = _latest(tmp_path)
    assert step == 4
    _assert_same_params(params, saves[0][1])
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@pytest.mark.slow  # a run stopped by Ctrl-C and resumed
def test_skipped_steps_are_counted_across_a_ctrl_c_right_after_a_periodic_checkpoint(
    tiny_model_dir, tiny_glue_dir, tmp_path, monkeypatch
):
    """on_nonfinite=skip with NaN steps 3..5, and SIGINT (Ctrl-C) during step 4, a step saved anyway:
    it is saved once (orbax refuses a second save), and the resumed run counts all three skips."""
    config = _config(tiny_model_dir, tiny_glue_dir, on_nonfinite="skip", num_epochs=1, checkpoint_every_steps=2)
    _poison_steps(monkeypatch, first=3, last=5)
    saves = _record_saves(monkeypatch)
    original_next = input_pipeline.TrainIterator.__next__
    batches = 0

    def next_then_interrupt(self):
        nonlocal batches
        batches += 1
        if batches == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original_next(self)

    handler_before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as interrupting:
        interrupting.setattr(input_pipeline.TrainIterator, "__next__", next_then_interrupt)
        with pytest.raises(errors.Preempted, match=r"stopped by SIGINT at step 4; .* Rerun the same command") as info:
            train.train_and_evaluate(config, tmp_path)
    assert info.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert [step for step, _ in saves] == [2, 4]

    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["skipped_steps"] == 3
    assert [step for step, _ in saves] == [2, 4, 6, 8]
    params = dict(saves)
    # A skipped step leaves the parameters as they were: steps 3 and 4 change nothing, step 6 does.
    _assert_same_params(params[4], params[2])
    assert not np.array_equal(params[6]["classifier"]["bias"], params[4]["classifier"]["bias"])
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params[8]))
    assert '"step": 8, "train/loss"' in (tmp_path / "metrics.jsonl").read_text()
    assert '"train/skipped_steps": 3' in (tmp_path / "metrics.jsonl").read_text()


def test_a_skipped_step_still_counts_for_the_learning_rate_schedule(
    tiny_model_dir, tiny_glue_dir, tmp_path, monkeypatch
):
    """Otherwise the optimizer's step count falls behind the loop's: the rate applied is not the one
    logged, and the decay never reaches zero."""
    config = _config(tiny_model_dir, tiny_glue_dir, on_nonfinite="skip", num_epochs=1)
    _poison_steps(monkeypatch, first=3, last=5)
    assert train.train_and_evaluate(config, tmp_path)["skipped_steps"] == 3
    manager = checkpoint.checkpoint_manager(tmp_path)
    restored = manager.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = jax.tree_util.tree_flatten_with_path(restored.state["opt_state"])[0]
    counts = [int(leaf) for path, leaf in leaves if "count" in jax.tree_util.keystr(path)]
    assert len(counts) >= 2 and set(counts) == {8}, counts  # Adam's and the schedule's


# --- Untrusted weight files ---------------------------------------------------------------------
# (Truncated or garbage model.safetensors and a .bin holding a non-tensor class: tests/test_weights.py.
# Truncated and foreign adapter exports: the table in tests/test_validation.py.)


class _Payload:
    """Unpickling this calls open(marker, "w"): code run by merely loading the file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_bin_that_runs_code_when_unpickled_is_refused_unrun(tiny_model_dir, tmp_path, writer):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    marker = tmp_path / "code-ran"
    path = folder / weights.TORCH_FILE
    payload = {"embeddings.word_embeddings.weight": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch's own protocol

    with pytest.raises(errors.WeightsError, match=re.escape(str(path))):
        weights.load_pretrained(folder)
    assert not marker.exists()
    # The file is what it claims: a plain unpickler runs the payload.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()
