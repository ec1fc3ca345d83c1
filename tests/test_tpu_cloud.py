"""scripts.tpu.launch end to end, as the cloud really behaves: the real launcher, a stand-in `gcloud` first on PATH
(tests/fake_gcloud: TPU VMs whose workers are local folders, with faults on demand), and the Cloud Storage emulator
as the bucket, running a tiny sweep. What the launcher must survive: a pod (whose ssh needs an agent), transient
gcloud failures, Ctrl-C, a spot preemption."""

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from etils import epath

from adapter_jax.history import read_history
from tests.conftest import GCS_BUCKET
from tests.fake_gcloud import gcloud as fake_gcloud
from tests.test_cli_robustness import RUN, _command, _run

pytestmark = pytest.mark.slow  # the launcher, gcloud and the sweeps in subprocesses, on the storage emulator
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GRID = ["--modes=adapters", "--learning_rates=0.01", "--epochs=1", "--adapter_sizes=8", "--seeds=0"]
TIMEOUT_S = 300


class Cloud:
    """One stand-in cloud: gcloud's state, a home folder for the launcher (its ~/.ssh), the bucket prefix."""

    def __init__(self, folder: pathlib.Path, gcs_env: dict[str, str], prefix: str):
        self.folder, self.state, self.home = folder, folder / "gcloud", folder / "home"
        self.home.mkdir(parents=True)
        fake_gcloud.install(folder / "bin", self.state)
        self.bucket = f"gs://{GCS_BUCKET}/{prefix}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("SSH_")}  # no agent
        self.env = {**env, **gcs_env, "PATH": f"{folder / 'bin'}:{os.environ['PATH']}", "HOME": str(self.home),
                    "FAKE_GCLOUD_STATE": str(self.state), "PYTHONPATH": str(REPO_ROOT)}

    def flags(self, name: str, model_dir: pathlib.Path, *extra: str) -> list[str]:
        sweep_flags = " ".join(f"--config.{key}={value}" for key, value in RUN.items())
        return [f"--name={name}", "--zone=us-central2-b", "--project=test-project", f"--bucket={self.bucket}",
                "--tasks=rte", f"--model={model_dir}", "--dtype=float32", f"--glue_source={self.bucket}/glue",
                *GRID, f"--sweep_flags={sweep_flags}",
                "--poll_seconds=1", "--gcloud_retries=2", "--ssh_retries=5", f"--local_out={self.folder / name}",
                *extra]

    def launcher(self, flags: list[str], log: pathlib.Path, **env: str) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, "-m", "scripts.tpu.launch", *flags], cwd=REPO_ROOT,
                                    env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT)

    def launch(self, flags: list[str], log: pathlib.Path, **env: str) -> str:
        process = self.launcher(flags, log, **env)
        try:
            process.wait(timeout=TIMEOUT_S)
        finally:
            process.kill()
        output = log.read_text()
        assert process.returncode == 0, output
        return output

    def calls(self) -> list[str]:
        return [" ".join(call["argv"]) for call in fake_gcloud.calls(self.state)]


def _upload(local: pathlib.Path, remote: epath.Path) -> None:
    for path in local.rglob("*"):
        if path.is_file():
            (remote / path.relative_to(local)).write_bytes(path.read_bytes())


def _scores(results: epath.Path) -> dict[str, float]:
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    return {pathlib.PurePosixPath(run["workdir"]).name: run["score"] for run in runs}


@pytest.fixture(scope="module")
def cloud_env(gcs_emulator):
    """gcs_emulator's environment in this process too, for reading the bucket (as conftest's gcs_env does)."""
    import fsspec.config

    with pytest.MonkeyPatch.context() as patch:
        for key, value in gcs_emulator.env.items():
            patch.setenv(key, value)
        patch.setitem(fsspec.config.conf, "gcs", {"token": "anon", "use_listings_cache": False})
        yield gcs_emulator.env


@pytest.fixture(scope="module")
def local_scores(tiny_model_dir, tiny_glue_dir, tmp_path_factory) -> dict[str, float]:
    """The same tiny sweep run directly, on this machine, into a local folder."""
    workdir = tmp_path_factory.mktemp("local-sweep") / "rte"
    sweep = _run(_command("scripts.sweep", workdir, tiny_model_dir, tiny_glue_dir, *GRID))
    assert sweep.returncode == 0, sweep.stderr
    return _scores(epath.Path(workdir) / "results.jsonl")


@pytest.fixture
def cloud(tmp_path, cloud_env, tiny_glue_dir) -> Cloud:
    made = Cloud(tmp_path, cloud_env, tmp_path.name)
    _upload(tiny_glue_dir, epath.Path(f"{made.bucket}/glue"))
    return made


@pytest.fixture(scope="module")
def clean_launch(tmp_path_factory, cloud_env, tiny_model_dir, tiny_glue_dir):
    """A single-host launch whose first 3 polls fail as gcloud does (an API error, exit 1, twice; ssh that
    cannot connect, exit 255, once): its cloud and its output."""
    folder = tmp_path_factory.mktemp("clean")
    cloud = Cloud(folder, cloud_env, folder.name)
    _upload(tiny_glue_dir, epath.Path(f"{cloud.bucket}/glue"))
    fake_gcloud.fail(cloud.state, "adapter-jax-run:", times=2, code=1)
    fake_gcloud.fail(cloud.state, "adapter-jax-run:", times=1, code=255)
    output = cloud.launch(cloud.flags("clean", tiny_model_dir), folder / "launch.log")
    return cloud, output


def test_a_single_host_run_reports_what_a_local_sweep_finds(clean_launch, local_scores):
    cloud, _ = clean_launch
    assert _scores(epath.Path(f"{cloud.bucket}/adapter-jax/clean/rte/results.jsonl")) == pytest.approx(
        local_scores, abs=1e-5)
    report = epath.Path(f"{cloud.bucket}/adapter-jax/clean/report/report.md").read_text()
    assert (cloud.folder / "clean" / "report.md").read_text() == report
    # Only the files git tracks went to the worker.
    copied = {p.relative_to(fake_gcloud.worker_home(cloud.state, "clean", {"generation": 1}, 0) / "adapter-jax")
              for p in (fake_gcloud.worker_home(cloud.state, "clean", {"generation": 1}, 0) / "adapter-jax").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert {str(p) for p in copied} <= set(tracked.stdout.splitlines())
    assert "setup.py" in {str(p) for p in copied}


def test_transient_gcloud_failures_while_polling_delete_nothing(clean_launch):
    cloud, output = clean_launch
    calls = fake_gcloud.calls(cloud.state)
    polls = [call["code"] for call in calls if "adapter-jax-run:" in " ".join(call["argv"])]
    assert polls[:3] == [1, 1, 255] and polls[-1] == 0
    deletes = [i for i, call in enumerate(calls) if call["argv"][3:4] == ["delete"]]
    report = next(i for i, call in enumerate(calls) if "scripts.report" in " ".join(call["argv"]))
    assert len(deletes) == 1 and deletes[0] > report  # the VM went once, after the report
    assert output.count("the run's state is unknown, not failed") == 3
    assert fake_gcloud.vm(cloud.state, "clean") is None


def _run_logs(cloud: Cloud, name: str, generation: int, worker: int) -> str:
    """Every log file the run's processes wrote on that worker (a bucket workdir logs to the VM's own /tmp)."""
    home = fake_gcloud.worker_home(cloud.state, name, {"generation": generation}, worker)
    return "".join(p.read_text() for p in sorted((home / "tmp" / "adapter-jax-logs").glob("*.log")))


def test_a_pod_run_joins_its_hosts_and_needs_no_agent_from_the_user(cloud, tiny_model_dir, local_scores):
    """A v4-16 (2 workers, 1 device each: 2 in all, as the local sweep has) launched with no ssh-agent and no
    gcloud key: the launcher makes the key and a private agent, so gcloud's ssh to both workers does not stall."""
    output = cloud.launch(cloud.flags("pod", tiny_model_dir, "--accelerator_type=v4-16"), cloud.folder / "launch.log",
                          FAKE_TPU_CHIPS_PER_WORKER="1")
    assert "in a private ssh-agent" in output
    assert (cloud.home / ".ssh" / "google_compute_engine").exists()
    assert _scores(epath.Path(f"{cloud.bucket}/adapter-jax/pod/rte/results.jsonl")) == pytest.approx(
        local_scores, abs=1e-5)
    for worker in (0, 1):  # the workers' processes joined as processes 0 and 1 of one run (apart, both are 0)
        assert f"[process={worker}]" in _run_logs(cloud, "pod", 1, worker)
    assert fake_gcloud.vm(cloud.state, "pod") is None


def test_ctrl_c_while_polling_leaves_the_vm_and_attach_completes_the_run(cloud, tiny_model_dir, local_scores):
    flags = cloud.flags("detach", tiny_model_dir)
    log = cloud.folder / "launch.log"
    launcher = cloud.launcher(flags, log)
    try:
        deadline = time.time() + TIMEOUT_S
        while not any("adapter-jax-run:" in call for call in cloud.calls()):  # a poll has answered
            assert launcher.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 130, log.read_text()
    finally:
        launcher.kill()
    output = log.read_text()
    assert fake_gcloud.vm(cloud.state, "detach")["state"] == "READY"
    assert not any(" delete " in call for call in cloud.calls())
    attach = shlex.split(next(line for line in output.splitlines() if line.endswith("--attach")))
    assert attach[1:3] == ["-m", "scripts.tpu.launch"] and attach[3:-1] == flags
    cloud.launch(attach[3:], cloud.folder / "attach.log")
    assert _scores(epath.Path(f"{cloud.bucket}/adapter-jax/detach/rte/results.jsonl")) == pytest.approx(
        local_scores, abs=1e-5)
    assert fake_gcloud.vm(cloud.state, "detach") is None
    assert sum("tpu-vm create" in call for call in cloud.calls()) == 1


@pytest.mark.skipif("lock_lease_seconds" not in (REPO_ROOT / "configs" / "glue.py").read_text(),
                    reason="a lock of another host is taken over only once locks are leases (config "
                           "lock_lease_seconds, issue 24's run side)")
def test_a_preempted_spot_run_is_recreated_and_resumes_from_the_bucket(cloud, tiny_model_dir, local_scores):
    lease = "--lock_lease_seconds=3 --config.lock_lease_seconds=3"
    flags = [("--sweep_flags=" + f.removeprefix("--sweep_flags=") + f" {lease}") if f.startswith("--sweep_flags=")
             else f for f in cloud.flags("spot", tiny_model_dir, "--spot", "--max_recoveries=1")]
    log = cloud.folder / "launch.log"
    launcher = cloud.launcher(flags, log, FAKE_TPU_STEP_SECONDS="3")
    run = epath.Path(f"{cloud.bucket}/adapter-jax/spot/rte/adapters-m8-lr0.01-ep1-seed0")
    try:
        deadline = time.time() + TIMEOUT_S
        # Step 2's checkpoint complete (on a bucket orbax marks that by commit_success.txt): steps 3 and 4 to come.
        while not (run / "checkpoints" / "2" / "commit_success.txt").exists():
            assert launcher.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        fake_gcloud.preempt(cloud.state, "spot")
        assert launcher.wait(timeout=TIMEOUT_S) == 0, log.read_text()
    finally:
        launcher.kill()
    output = log.read_text()
    assert "was preempted (SUSPENDED): deleting and recreating it" in output
    assert sum("queued-resources create" in call for call in cloud.calls()) == 2
    assert _scores(epath.Path(f"{cloud.bucket}/adapter-jax/spot/rte/results.jsonl")) == pytest.approx(
        local_scores, abs=1e-5)
    steps = [record["step"] for record in read_history(run) if "train/loss" in record]
    assert steps == [1, 2, 3, 4]  # resumed from step 2's checkpoint: no step logged twice
    second_vm = _run_logs(cloud, "spot", 2, 0)
    assert "Resumed from" in second_vm and re.search(r"Taking over .*lock.json .*spot-g1-w0", second_vm)
