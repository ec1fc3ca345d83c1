"""scripts/tpu/sky_sweep.yaml, read by SkyPilot's own task loader (`sky.Task.from_yaml_config`), in a virtual
environment of its own (SkyPilot's server dependencies stay out of the project's): $SKY_VENV, default
~/.cache/adapter-sky-venv, made by `python3 -m venv` and `pip install skypilot==0.9.2`."""

import json
import os
import pathlib
import shlex
import subprocess

import pytest
from conftest import missing_outside_ci

from scripts.tpu import flags as launch_flags
from scripts.tpu import remote

pytestmark = pytest.mark.slow  # SkyPilot imports for seconds
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK_FILE = REPO_ROOT / "scripts" / "tpu" / "sky_sweep.yaml"
SKY_PYTHON = pathlib.Path(os.environ.get("SKY_VENV", "~/.cache/adapter-sky-venv")).expanduser() / "bin" / "python"
LOAD = """
import json, sys, yaml, sky
config = yaml.safe_load(open(sys.argv[1]))
task = sky.Task.from_yaml_config(config, env_overrides=json.loads(sys.argv[2]))
(resources,) = task.resources
print(json.dumps({"name": task.name, "run": task.run, "setup": task.setup, "envs": task.envs,
                  "accelerators": resources.accelerators, "use_spot": resources.use_spot,
                  "job_recovery": resources.job_recovery, "workdir": task.workdir}))
"""


@pytest.fixture(scope="module")
def sky_python() -> pathlib.Path:
    if not SKY_PYTHON.exists():
        missing_outside_ci(f"no SkyPilot environment at {SKY_PYTHON} (set SKY_VENV, or make it: see this file's doc)")
    return SKY_PYTHON


def _load(sky_python: pathlib.Path, **envs: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(sky_python), "-c", LOAD, str(TASK_FILE), json.dumps(list(envs.items()))],
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT)


def test_skypilot_loads_the_task_as_a_spot_tpu_job_that_runs_the_launchers_sweep(sky_python):
    loaded = _load(sky_python, BUCKET="gs://my-bucket", TASK="mnli")
    assert loaded.returncode == 0, loaded.stderr
    task = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert task["accelerators"] == {"tpu-v4-8": 1} and task["use_spot"] is True
    assert task["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"
    assert task["envs"]["BUCKET"] == "gs://my-bucket" and task["envs"]["TASK"] == "mnli"
    # The same sweep as the launcher's for the same bucket, run name, task, model and dtype.
    flags = launch_flags.parse_flags(["--name=sky", "--zone=us-central2-b", "--bucket=gs://my-bucket",
                                      "--tasks=mnli"])
    expected = shlex.split(remote.sweep_shell(flags, "mnli"))
    run = task["run"].replace("\\\n", " ")
    for name, value in sorted(task["envs"].items(), key=lambda item: -len(item[0])):  # $RUN_NAME before $RUN
        run = run.replace(f"${name}", value)
    assert shlex.split(run) == expected
    assert "constraints.txt" in task["setup"] and "--python=3.11" in task["setup"]


def test_the_bucket_is_required(sky_python):
    loaded = _load(sky_python)
    assert loaded.returncode != 0
    assert "BUCKET" in loaded.stderr
