"""Multi-process runs: the start-up flags, and an emulated pod (two processes of 2 fake CPU devices each, JAX's
gloo CPU collectives) running the real sweep into one shared workdir: a local folder, and a bucket of the Cloud
Storage emulator (conftest.gcs_emulator), as on a Cloud TPU pod."""

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import fsspec.config
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from etils import epath

from adapter_jax import distributed
from adapter_jax.errors import ConfigError
from adapter_jax.history import read_history
from adapter_jax.workdir import Workdir
from tests import conftest
from tests.conftest import GCS_BUCKET, REPO_ROOT, free_port
from tests.test_cli_robustness import RUN, _command, _start, _wait_for

GRID = ["--modes=adapters", "--learning_rates=0.01", "--epochs=1", "--adapter_sizes=8", "--seeds=0"]
RUN_DIR = "adapters-m8-lr0.01-ep1-seed0"
# Files of the run that orbax writes (every process calls its saves), or that are each process's own (its log, a
# temporary file, the probe of write access).
PER_PROCESS = re.compile(r"/checkpoints/|/logs/|\.tmp-|\.probe-")


def test_the_start_up_flags_come_together_or_not_at_all():
    with pytest.raises(ConfigError, match="--coordinator_address, --process_id missing"):
        distributed.initialize(None, 2, None)
    with pytest.raises(ConfigError, match="--process_id=2 must be below --num_processes=2"):
        distributed.initialize("localhost:1", 2, 2)
    distributed.initialize(None, None, None)  # no flags, not a Cloud TPU VM: one process, nothing started
    assert not jax.distributed.is_initialized()


def _pod(workdir, model_dir, glue_dir, logs, run=RUN, process_envs=({}, {}), **faults):
    """The sweep as two processes of one run, each with 2 fake CPU devices, run from `logs`; each records the
    local files it writes, and runs with its own `process_envs` entry."""
    command = _command("scripts.sweep", workdir, model_dir, glue_dir, *GRID, run=run)
    address = f"--coordinator_address=localhost:{free_port()}"
    return [
        _start([*command, address, "--num_processes=2", f"--process_id={index}"], logs / f"process{index}.log",
               cwd=logs, WRITES_LOG=logs / f"process{index}.writes", **{**faults, **process_envs[index]})
        for index in range(2)
    ]


def _shared_files_written(paths, workdir) -> collections.Counter:
    """How often each of the run's shared files (not orbax's, not a log) is among `paths`, the files one process
    wrote."""
    return collections.Counter(path for path in paths if path.startswith(f"{workdir}/") and not PER_PROCESS.search(path))


@pytest.mark.slow  # two-process pods in subprocesses
@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_two_process_sweep_equals_one_process_over_as_many_devices_and_process_0_writes(
    where, request, tiny_model_dir, tiny_glue_dir, tmp_path
):
    """On the bucket each process talks to the emulator through a port of its own, which records the objects
    created through it, whichever library (gcsfs, google-cloud-storage, tensorstore) wrote them."""
    if where == "bucket":
        emulator = request.getfixturevalue("gcs_emulator")
        request.getfixturevalue("gcs_env")  # this process reads the export from the bucket
        pod_dir = epath.Path(f"gs://{GCS_BUCKET}/{tmp_path.name}/pod")
        process_envs = [emulator.client_env(index) for index in range(2)]
    else:
        pod_dir = epath.Path(tmp_path / "pod")
        process_envs = [{}, {}]
    pod = _pod(pod_dir, tiny_model_dir, tiny_glue_dir, tmp_path, process_envs=process_envs)
    single = _start(_command("scripts.sweep", tmp_path / "single", tiny_model_dir, tiny_glue_dir, *GRID),
                    tmp_path / "single.log", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for process in [*pod, single]:
        process.wait(timeout=600)
        assert process.returncode == 0, process.log_path.read_text()

    exported = [safetensors.numpy.load((workdir / RUN_DIR / "export" / "adapters.safetensors").read_bytes())
                for workdir in (pod_dir, epath.Path(tmp_path / "single"))]
    assert sorted(exported[0]) == sorted(exported[1])
    for name, value in exported[0].items():
        np.testing.assert_allclose(value, exported[1][name], rtol=1e-5, atol=1e-6, err_msg=name)

    local_writes = [(tmp_path / f"process{index}.writes").read_text().splitlines() for index in range(2)]
    if where == "bucket":
        # A gs:// path taken for a local one would be written as gs:/<bucket>/... (or /gs/...) on local disk.
        in_bucket = str(pod_dir).removeprefix("gs://")
        assert not [path for path in local_writes[0] + local_writes[1] if in_bucket in path]
        writes = [emulator.written_by(index) for index in range(2)]
    else:
        writes = local_writes
    assert _shared_files_written(writes[1], pod_dir) == {}
    written = _shared_files_written(writes[0], pod_dir)
    run = pod_dir / RUN_DIR
    for once in ("export/adapters.safetensors", "summary.json", "config.json", "submission/RTE.tsv",
                 "submission/complete.json"):
        assert written[str(run / once)] == 1, (once, written)
    assert written[str(pod_dir / "best.json")] == 1 and written[str(pod_dir / "results.jsonl")]
    # The record sees both processes: each probes its write access, and orbax's saves (tensorstore) show.
    assert all(any(".probe-" in path for path in paths) for paths in writes), writes
    assert any("/checkpoints/" in path for path in writes[0]), writes[0]


@pytest.mark.slow  # two-process pods in subprocesses
def test_when_a_process_of_a_pod_dies_the_other_stops_with_an_error_and_both_resume_on_a_bucket(
    gcs_env, tiny_model_dir, tiny_glue_dir, tmp_path
):
    """The pod's shared workdir is gs://: orbax's multi-process saves, process 0's files and the resume all go
    through the emulated bucket."""
    sweep_dir = epath.Path(f"gs://{GCS_BUCKET}/{tmp_path.name}/pod")
    run = {**RUN, "num_train_steps": 8}
    pod = _pod(sweep_dir, tiny_model_dir, tiny_glue_dir, tmp_path, run=run, SLOW_STEPS=0.5, **gcs_env)
    step_2 = sweep_dir / RUN_DIR / "checkpoints" / "2"
    # On a bucket orbax writes a step's folder in place and marks it done last (commit_success.txt); a kill
    # before that leaves a step that a resume rightly ignores.
    _wait_for(lambda: step_2.exists() and ocp.step.is_checkpoint_finalized(step_2), pod[0])
    pod[1].kill()
    killed = time.time()
    pod[0].wait(timeout=300)
    output = pod[0].log_path.read_text()
    assert pod[0].returncode not in (0, None), output
    assert time.time() - killed < distributed.HEARTBEAT_TIMEOUT_S + 30, output
    # JAX's coordination service ends the survivor, naming the cause, once the dead one misses its heartbeats.
    assert "another task died" in output and "stopped sending heartbeats" in output, output

    (tmp_path / "rerun").mkdir()
    rerun = _pod(sweep_dir, tiny_model_dir, tiny_glue_dir, tmp_path / "rerun", run=run, **gcs_env)
    for process in rerun:
        process.wait(timeout=600)
        assert process.returncode == 0, process.log_path.read_text()
    assert re.search(r"Resumed from gs://.* at step [2-7]\.", rerun[0].log_path.read_text())

    workdir = sweep_dir / RUN_DIR
    steps = [r["step"] for r in read_history(workdir) if "train/loss" in r]
    assert steps == list(range(1, 9))  # the steps logged after the last checkpoint are not repeated
    for name in ("export/adapters.safetensors", "summary.json", "submission/RTE.tsv", "submission/complete.json"):
        assert (workdir / name).exists(), name
    assert (sweep_dir / "best.json").exists() and (sweep_dir / "results.jsonl").exists()
    assert not Workdir(workdir).lock.exists()
    local = {p.name for p in [*tmp_path.iterdir(), *(tmp_path / "rerun").iterdir()]}
    assert not local & {"gs:", "gs"}, local  # a gs:// path taken for a local one would appear there


def _pod_of_main(workdir, model_dir, glue_dir, logs, *extra, process_envs=({}, {}), **faults):
    """adapter_jax.main as two processes of one run (2 fake CPU devices each), run from `logs`."""
    command = _command("adapter_jax.main", workdir, model_dir, glue_dir, *extra)
    address = f"--coordinator_address=localhost:{free_port()}"
    return [
        _start([*command, address, "--num_processes=2", f"--process_id={index}"], logs / f"process{index}.log",
               cwd=logs, **{**faults, **process_envs[index]})
        for index in range(2)
    ]


@pytest.mark.slow  # a run, then a two-process pod, in subprocesses
def test_a_pod_whose_latest_checkpoint_is_damaged_falls_back_to_the_same_step_on_every_process(
    tiny_model_dir, tiny_glue_dir, tmp_path
):
    workdir = tmp_path / "run"
    first = _start(_command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir), tmp_path / "first.log",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
    first.wait(timeout=600)
    assert first.returncode == 0, first.log_path.read_text()
    (workdir / "summary.json").unlink()
    for path in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    pod = _pod_of_main(workdir, tiny_model_dir, tiny_glue_dir, tmp_path)
    for process in pod:
        process.wait(timeout=600)
        assert process.returncode == 0, process.log_path.read_text()
        output = process.log_path.read_text()
        assert "Resumed from" in output and "at step 2." in output, output
        assert "tensorstore_spec" not in output, output  # the full error is in the log file alone
    assert re.search(r"cannot read the state of checkpoint step 4 in .*; falling back to step 2 \(details in the log "
                     r"file\)\n", pod[0].log_path.read_text())
    assert [p.name.split("-")[0] for p in (workdir / "corrupt_checkpoints").iterdir()] == ["4"]
    assert (workdir / "summary.json").exists()
    assert [r["step"] for r in read_history(workdir) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow  # a two-process pod and a storage emulator of its own, in subprocesses
def test_a_pod_whose_bucket_stops_answering_ends_with_an_error_within_the_storage_deadline(
    tiny_model_dir, tiny_glue_dir, tmp_path
):
    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "gcs_emulator.py"), "start", "--host=localhost", f"--port={port}",
         "--in-memory", f"--default-bucket={GCS_BUCKET}", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not _listens(port):
            assert emulator.poll() is None, "the Cloud Storage emulator did not start"
            time.sleep(0.1)
        deadline_minutes = 0.3
        workdir = epath.Path(f"gs://{GCS_BUCKET}/run")
        env = conftest._environment(f"http://localhost:{port}")
        pod = _pod_of_main(workdir, tiny_model_dir, tiny_glue_dir, tmp_path,
                           f"--config.storage_deadline_minutes={deadline_minutes}", SLOW_STEPS=0.5, **env)
        step_2 = workdir / "checkpoints" / "2"
        with mock.patch.dict(os.environ, env), mock.patch.dict(fsspec.config.conf, {"gcs": {"token": "anon", "use_listings_cache": False}}):
            _wait_for(lambda: step_2.exists() and ocp.step.is_checkpoint_finalized(step_2), pod[0])
        emulator.send_signal(signal.SIGSTOP)  # every request from now on waits for an answer that never comes
        stopped = time.time()
        for process in pod:
            process.wait(timeout=deadline_minutes * 60 + 120)
            assert process.returncode == 1, process.log_path.read_text()
        assert time.time() - stopped < deadline_minutes * 60 + 60
        for process in pod:  # process 0 was writing the export, process 1 its part of the checkpoint
            output = process.log_path.read_text()
            assert re.search(rf"error: [a-z ]+ {workdir}/\S+ did not finish within {deadline_minutes} minutes "
                             r"\(config.storage_deadline_minutes\)", output), output
    finally:
        emulator.send_signal(signal.SIGCONT)
        emulator.kill()
        emulator.wait()


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("localhost", port), timeout=1).close()
    except OSError:
        return False
    return True
