"""The entry point as a person sees it: the console carries the progress bar and our own lines only."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the entry point in a subprocess

# Our log lines on the console: time, then the message.
OWN_LINE = re.compile(r"\d\d:\d\d:\d\d (Full log: |JAX devices: |step \d+ dev )")


def test_third_party_info_lines_go_to_the_log_file_not_the_console(tiny_model_dir, tiny_glue_dir, tmp_path):
    workdir = tmp_path / "run"
    overrides = {
        "model": tiny_model_dir, "glue_dir": tiny_glue_dir, "max_seq_length": 32, "buckets": "(32,)",
        "global_batch_size": 8, "eval_batch_size": 8, "num_train_steps": 6, "adapter_size": 8,
        "log_every_steps": 2, "checkpoint_every_steps": 3,
    }
    command = [sys.executable, "-m", "adapter_jax.main", "--config=configs/glue.py:rte", f"--workdir={workdir}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"]}
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr

    console = [line for line in re.split(r"[\r\n]+", run.stderr) if line.strip()]
    progress_bar = [line for line in console if line.startswith("rte:")]
    assert progress_bar and "6/6" in progress_bar[-1]
    others = [line for line in console if line not in progress_bar]
    assert [line for line in others if not OWN_LINE.match(line)] == []
    assert any("step 6 dev" in line for line in others)

    (log_file,) = (workdir / "logs").iterdir()
    assert f"Full log: {log_file}" in run.stderr
    log = log_file.read_text()
    # orbax's INFO lines (dozens per checkpoint) are there, with the project's own lines.
    orbax_lines = [line for line in log.splitlines() if re.match(r"I\d{4} .*\] ", line) and "checkpoint" in line.lower()]
    assert len(orbax_lines) >= 10
    assert "step 6 dev" in log
