"""scripts.tpu.launch end to end, as the cloud really behaves: the real launcher, a stand-in `gcloud` first on PATH
(tests/fake_gcloud: TPU VMs whose workers are local folders, with faults on demand), and the Cloud Storage emulator
as the bucket, running a tiny sweep. What the launcher must survive: a pod (whose ssh needs an agent), transient
gcloud failures, Ctrl-C, a spot preemption."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from etils import epath

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


@pytest.fixture(scope="module")
def glue_in_bucket(cloud_env, tiny_glue_dir) -> str:
    prefix = "tpu-cloud-glue"
    _upload(tiny_glue_dir, epath.Path(f"gs://{GCS_BUCKET}/{prefix}"))
    return prefix


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
