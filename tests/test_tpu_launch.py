"""scripts.tpu.launch: the gcloud command sequence, its dry run, bad flags, retries, preemption, detaching, and
deletion on failure (gcloud stood in for by a recording function; tests/test_tpu_cloud.py runs the real thing)."""

import os
import pathlib
import shlex
import signal
import subprocess
import time

import pytest

from scripts.tpu import flags as launch_flags
from scripts.tpu import launch, remote

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


def _verb(argv: list[str]) -> str:
    return argv[4] if argv[1] == "compute" else argv[2]


def test_dry_run_prints_the_whole_sequence_and_runs_nothing(capsys):
    commands = _dry_run(capsys)
    assert [_verb(argv) for argv in commands] == [
        "create", "scp", "ssh", "ssh", "ssh", "ssh", "ssh", "ssh", "rsync", "delete"]
    create, copy, install, download, local_data, start, poll, report, fetch, delete = commands
    assert create[5:] == ["adapters-glue", "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-8",
                          "--version=tpu-ubuntu2204-base"]
    assert "--worker=all" in copy and copy[5:7] == ["tpu_runs/adapters-glue/project", "adapters-glue:adapter-jax"]
    assert "--worker=all" in install
    # A Python 3.11 environment made by uv (the image's python3 is 3.10), the project pinned by constraints.txt.
    install_steps = _ssh_command(install).split(" && ")
    assert "python3 -m uv venv --python=3.11 $HOME/adapter-jax-venv" in _ssh_command(install)
    assert ('python3 -m uv pip install --python=$HOME/adapter-jax-venv/bin/python -c constraints.txt '
            '-e ".[tpu,tfds,report]"') in install_steps
    assert "assert sys.version_info >= (3, 11)" in install_steps[-1]
    assert install_steps[-1].startswith("$HOME/adapter-jax-venv/bin/python -c")
    assert not any(step.startswith("python3 -m pip install -e") for step in install_steps)
    assert (REPO_ROOT / "constraints.txt").is_file()
    # GLUE fetched once into the bucket by scripts.download_glue (AX too, which MNLI's runs predict), then copied.
    assert "--worker=0" in download
    assert _ssh_command(download) == ("cd adapter-jax && $HOME/adapter-jax-venv/bin/python -m scripts.download_glue "
                                      "--tasks=rte,mnli,ax --out=gs://my-bucket/glue_data")
    assert "--worker=all" in local_data and "gs://my-bucket/glue_data $HOME/glue_data" in _ssh_command(local_data)
    # Both sweeps, one after the other, detached from the ssh session on every worker.
    assert "--worker=all" in start
    start_shell = _ssh_command(start)
    assert "setsid nohup bash -c" in start_shell and "> $HOME/adapter-jax-job/log 2>&1 < /dev/null &" in start_shell
    job = shlex.split(start_shell.split("setsid nohup bash -c ", 1)[1])[0]
    sweeps = job.split("; echo $?")[0].split(" && ")
    for task, sweep in zip(("rte", "mnli"), sweeps, strict=True):
        sweep_argv = shlex.split(sweep)
        assert sweep_argv[:5] == ["GLUE_DIR=$HOME/glue_data", "$HOME/adapter-jax-venv/bin/python", "-m",
                                  "scripts.sweep", f"--config=configs/glue.py:{task}"]
        assert f"--workdir=gs://my-bucket/adapter-jax/adapters-glue/{task}" in sweep_argv
        assert {"--config.model=bert-large-uncased", "--config.dtype=bfloat16"} <= set(sweep_argv)
    assert "--worker=0" in poll and "echo 'adapter-jax-run: running'" in _ssh_command(poll)
    assert "gs://my-bucket/adapter-jax/adapters-glue/mnli/results.jsonl" in _ssh_command(report)
    assert "$HOME/adapter-jax-venv/bin/python -m scripts.report " in _ssh_command(report)
    assert fetch[-2:] == ["gs://my-bucket/adapter-jax/adapters-glue/report", "tpu_runs/adapters-glue"]
    assert delete[4:6] == ["delete", "adapters-glue"] and "--quiet" in delete


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"),  # one host
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),  # v5e, one host
    ("v4-16", "tpu-ubuntu2204-base"),  # a pod slice of two hosts
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_one_host_and_pod_slices(capsys, tmp_path, accelerator, version):
    commands = _dry_run(capsys, f"--accelerator_type={accelerator}")
    assert commands[0][-2:] == [f"--accelerator-type={accelerator}", f"--version={version}"]
    # Every worker gets the project, the environment, the data and the run; worker 0 alone downloads, is polled
    # and reports; on a pod the sweep is one program over every host, started on all of them.
    ssh_workers = [next(a for a in argv if a.startswith("--worker=")) for argv in commands[1:8]]
    assert ssh_workers == ["--worker=all", "--worker=all", "--worker=0", "--worker=all", "--worker=all",
                           "--worker=0", "--worker=0"]
    install, start = _ssh_command(commands[2]), _ssh_command(commands[5])
    assert "uv venv --python=3.11" in install and "assert sys.version_info >= (3, 11)" in install
    assert "-c constraints.txt" in install
    assert "setsid nohup bash -c" in start
    assert commands[-1][4:6] == ["delete", "adapters-glue"]
    # The VM goes when the run fails, on every kind of slice.
    gcloud = FakeGcloud(polls=(1,))
    with pytest.raises(launch.StepError, match="the sweeps failed"):
        _launch(tmp_path, gcloud, f"--accelerator_type={accelerator}")
    assert gcloud.calls[-1][4:6] == ["delete", "adapters-glue"]


def test_runtime_version_override_and_unknown_generation(capsys):
    commands = _dry_run(capsys, "--accelerator_type=v5litepod-16", "--runtime_version=v2-alpha-tpuv5-lite-custom")
    assert commands[0][-1] == "--version=v2-alpha-tpuv5-lite-custom"
    with pytest.raises(SystemExit):
        launch.main([*BASE, "--accelerator_type=v9-8", "--dry_run"])
    assert "no TPU software version known for it; pass --runtime_version" in capsys.readouterr().err
    assert launch.main([*BASE, "--accelerator_type=v9-8", "--runtime_version=future", "--dry_run"]) == 0


def test_tfds_builds_in_an_environment_of_its_own(capsys):
    commands = _dry_run(capsys, "--glue_source=tfds")
    install, build, local_data, start = commands[2:6]
    assert "tensorflow" not in _ssh_command(install)
    assert "--worker=0" in build
    build_steps = _ssh_command(build).split(" && ")
    assert "python3 -m uv venv --python=3.11 $HOME/tfds-build-venv" in build_steps[1]
    assert build_steps[2] == ("python3 -m uv pip install --python=$HOME/tfds-build-venv/bin/python tensorflow-cpu "
                              "\"$(grep -x 'tensorflow-datasets==.*' constraints.txt)\"")
    assert build_steps[3] == ("$HOME/tfds-build-venv/bin/python -m tensorflow_datasets.scripts.cli.main build "
                              "glue/rte glue/mnli glue/ax --data_dir=gs://my-bucket/tensorflow_datasets "
                              "--file_format=array_record")
    assert "gs://my-bucket/tensorflow_datasets/glue" in _ssh_command(local_data)
    assert "--config.data_source=tfds" in _ssh_command(start) and "GLUE_DIR" not in _ssh_command(start)


def test_keep_spot_gcs_folder_git_repo_and_grid(capsys):
    commands = _dry_run(capsys, "--keep", "--spot", "--glue_source=gs://data/glue", "--tasks=rte",
                        "--repo=https://github.com/example/adapter-jax.git", "--learning_rates=3e-4",
                        "--dtype=float32", "--sweep_flags=--config.max_seq_length=256")
    assert not any("delete" in argv for argv in commands)
    assert commands[0][-1] == "--spot"
    assert _ssh_command(commands[1]) == "git clone --depth=1 https://github.com/example/adapter-jax.git adapter-jax"
    assert _ssh_command(commands[3]) == "gcloud storage rsync -r gs://data/glue $HOME/glue_data"
    sweep = shlex.split(_ssh_command(commands[4]).split("setsid nohup bash -c ", 1)[1])[0].split("; echo $?")[0]
    assert sweep.startswith("GLUE_DIR=$HOME/glue_data $HOME/adapter-jax-venv/bin/python -m scripts.sweep "
                            "--config=configs/glue.py:rte")
    assert "--config.dtype=float32" in sweep and "--config.data_source" not in sweep
    assert sweep.endswith("--learning_rates=3e-4 --config.max_seq_length=256")


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--name", "--zone", "--accelerator_type", "--runtime_version", "--project", "--bucket", "--tasks",
                 "--model", "--dtype", "--glue_source", "--repo", "--run_name", "--local_out", "--modes",
                 "--learning_rates", "--epochs", "--adapter_sizes", "--seeds", "--sweep_flags", "--spot",
                 "--preemptible", "--keep", "--poll_seconds", "--ssh_retries", "--dry_run", "--attach",
                 "--max_recoveries", "--gcloud_retries"):
        assert flag in help_text, flag
    assert "v5litepod v2-alpha-tpuv5-lite" in help_text  # the runtime table, in the flag's help


def _run_shell(command: str, home: pathlib.Path) -> int:
    # ssh runs the command from the home folder.
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, timeout=30, check=False).returncode


def _poll_shell(command: str, home: pathlib.Path) -> remote.RunStatus | None:
    env = {**os.environ, "HOME": str(home)}
    polled = subprocess.run(["bash", "-c", command], cwd=home, env=env, timeout=30, check=False, capture_output=True,
                            text=True)
    assert polled.returncode == 0  # the run's status is in the output; an exit status would be gcloud's
    return remote.run_status(polled.stdout)


RUNNING_STATUS = remote.RunStatus(running=True)


@pytest.mark.slow  # bash processes polled for seconds
def test_the_detached_run_outlives_its_shell_and_the_poll_reports_it(tmp_path, monkeypatch):
    """The start and poll commands, run by bash in a fake home: the start returns at once, the run goes on,
    and the poll says running, then the run's own exit status; a run killed without one is reported as such."""
    monkeypatch.undo()  # this test starts processes (bash, not gcloud): lift the fixture's ban
    flags = launch_flags.parse_flags([*BASE, "--tasks=rte"])
    (tmp_path / "adapter-jax").mkdir()
    python = tmp_path / "adapter-jax-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    # A stand-in for the sweep: waits for a file, then exits 7 (the status the poll must pass on).
    python.write_text(f"#!/bin/bash\necho sweeping \"$@\"\nwhile [ ! -e {tmp_path}/finish ]; do sleep 0.05; done\n"
                      "exit 7\n")
    python.chmod(0o755)
    start, poll = (_ssh_command(remote.start_command(flags)), _ssh_command(remote.poll_command(flags)))
    try:
        assert _run_shell(start, tmp_path) == 0  # returns while the run goes on
        assert _poll_shell(poll, tmp_path) == RUNNING_STATUS
        assert _run_shell(start, tmp_path) == 0  # a second start leaves the running one alone
        (tmp_path / "finish").touch()
        deadline = time.monotonic() + 20
        while (status := _poll_shell(poll, tmp_path)) == RUNNING_STATUS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == remote.RunStatus(exit_code=7)
        log = (tmp_path / "adapter-jax-job" / "log").read_text()
        assert log.count("sweeping -m scripts.sweep --config=configs/glue.py:rte") == 1

        # Killed without writing a status (a VM restart): the poll says so instead of waiting forever.
        (tmp_path / "finish").unlink()
        (tmp_path / "adapter-jax-job" / "exit").unlink()
        assert _run_shell(start, tmp_path) == 0
        pid = int((tmp_path / "adapter-jax-job" / "pid").read_text())
        os.killpg(pid, signal.SIGKILL)  # setsid made the run a process group of its own
        deadline = time.monotonic() + 20
        while (status := _poll_shell(poll, tmp_path)) == RUNNING_STATUS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == remote.RunStatus()  # vanished
    finally:  # a failed assertion must not leave a stand-in running: it ends once this file exists
        (tmp_path / "finish").touch()


@pytest.mark.parametrize("flag, message", [
    ("--bucket=my-bucket", "not a GCS location"),
    ("--tasks=rte,squad", "unknown tasks"),
    ("--accelerator_type=tpu-8", "not a valid accelerator type"),
    ("--name=Adapters_GLUE", "not a valid TPU VM name"),
    ("--glue_source=/data/glue", "expected 'download', 'tfds' or a gs:// folder"),
    ("--repo=/nonexistent/folder", "neither a git URL nor a folder"),
    ("--poll_seconds=0", "'0' is not a positive float"),
    ("--ssh_retries=two", "'two' is not a positive int"),
    ("--max_recoveries=-1", "'-1' is not a whole number >= 0"),
    ("--bucket=gs://MY_BUCKET", "bucket names are lowercase"),
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


RUNNING, VANISHED = "running", "vanished"


class FakeGcloud:
    """Records each command; the first `fail_times` whose text contains `fail_on` exit 1. Polls answer `polls` in
    turn: RUNNING, VANISHED, the run's exit status (an int), or gcloud failing ("gcloud 1", "gcloud 255": no
    status line). `describe` answers `states` in turn, then READY; `git ls-files` lists nothing."""

    def __init__(self, fail_on: str | None = None, polls: tuple = (0,), states: tuple[str, ...] = (),
                 fail_times: int = 1 << 30):
        self.fail_on, self.calls, self.polls, self.states = fail_on, [], list(polls), list(states)
        self.fail_times = fail_times

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        text = shlex.join(argv)
        if "adapter-jax-run:" in text:
            answer = self.polls.pop(0)
            if isinstance(answer, str) and answer.startswith("gcloud"):
                return subprocess.CompletedProcess(argv, int(answer.split()[1]), "", "ERROR: (gcloud) ...")
            line = answer if isinstance(answer, str) else f"exit {answer}"
            return subprocess.CompletedProcess(argv, 0, f"a log line\nadapter-jax-run: {line}\n", "")
        if "describe" in argv:
            return subprocess.CompletedProcess(argv, 0, f"{self.states.pop(0) if self.states else 'READY'}\n", "")
        failed = self.fail_on is not None and self.fail_on in text and self.fail_times > 0
        self.fail_times -= failed
        return subprocess.CompletedProcess(argv, 1 if failed else 0, "", "")

    def gcloud_verbs(self) -> list[str]:
        return [_verb(argv) for argv in self.calls if argv[0] == "gcloud"]


def _launch(tmp_path, gcloud, *extra):
    sleeps = []
    launch.launch(launch_flags.parse_flags([*BASE, f"--local_out={tmp_path}", *extra]), run=gcloud,
                  sleep=sleeps.append)
    return sleeps


SETUP = ["create", "scp", "ssh", "ssh", "ssh", "ssh"]  # create, copy, install, download, copy GLUE, start


def test_polls_until_the_run_ends_riding_out_gcloud_failures_then_reports_and_deletes(tmp_path, capsys):
    gcloud = FakeGcloud(polls=(RUNNING, "gcloud 255", "gcloud 1", RUNNING, "gcloud 255", 0))
    sleeps = _launch(tmp_path, gcloud, "--poll_seconds=60", "--ssh_retries=2")
    # Between polls --poll_seconds; after a failed one, a backoff from 10 s (doubling, never above it).
    assert sleeps == [60, 10, 20, 60, 10]
    polls_and_states = ["ssh", "ssh", "describe", "ssh", "describe", "ssh", "ssh", "describe", "ssh"]
    assert gcloud.gcloud_verbs() == [*SETUP, *polls_and_states, "ssh", "rsync", "delete"]
    assert capsys.readouterr().out.count("the run's state is unknown, not failed") == 3


def test_the_status_line_is_found_after_a_progress_bar():
    assert remote.run_status("rte:  50%|#####     | 2/4\r\nadapter-jax-run: running\n") == RUNNING_STATUS
    assert remote.run_status("adapter-jax-run: exit 3\n") == remote.RunStatus(exit_code=3)
    assert remote.run_status("ERROR: (gcloud) TPUInUnusableTerminalState") is None


@pytest.mark.parametrize("polls, message", [
    ((RUNNING, 1), r"the sweeps failed \(exit 1\)"),
    ((VANISHED,), "the sweeps vanished"),
])
def test_a_failed_or_lost_run_still_deletes_the_vm(tmp_path, polls, message):
    gcloud = FakeGcloud(polls=polls)
    with pytest.raises(launch.StepError, match=message):
        _launch(tmp_path, gcloud, "--ssh_retries=2")
    assert "delete" in gcloud.calls[-1]
    assert not any("scripts.report" in shlex.join(argv) for argv in gcloud.calls)
    if "failed (exit" in message:  # every worker's log is shown before the VM goes
        assert "tail -n 40 $HOME/adapter-jax-job/log" in shlex.join(gcloud.calls[-2])


def test_gcloud_failing_for_long_leaves_the_vm_and_says_how_to_go_on(tmp_path, capsys):
    """gcloud's own failures (exit 1: an API error; 255: ssh) say nothing about the run, which may go on."""
    gcloud = FakeGcloud(polls=("gcloud 1", "gcloud 255", "gcloud 1"))
    with pytest.raises(launch.Detached, match="cannot reach worker 0 of adapters-glue: 3 polls in a row failed"):
        _launch(tmp_path, gcloud, "--ssh_retries=2")
    assert "delete" not in gcloud.gcloud_verbs()
    err = capsys.readouterr().err
    assert f"--local_out={tmp_path} --ssh_retries=2 --attach" in err
    assert "gcloud compute tpus tpu-vm delete adapters-glue" in err


def test_ctrl_c_while_polling_detaches_and_attach_picks_the_run_up(tmp_path, capsys):
    gcloud = FakeGcloud(polls=(RUNNING,))

    def interrupted(argv, **kwargs):
        if "adapter-jax-run:" in shlex.join(argv) and not gcloud.polls:
            raise KeyboardInterrupt
        return gcloud(argv, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        launch.launch(launch_flags.parse_flags([*BASE, f"--local_out={tmp_path}"]), run=interrupted,
                      sleep=lambda s: None)
    assert gcloud.gcloud_verbs() == [*SETUP, "ssh"]  # no delete
    err = capsys.readouterr().err
    attach = next(line for line in err.splitlines() if line.endswith("--attach"))
    assert shlex.split(attach)[1:4] == ["-m", "scripts.tpu.launch", BASE[0]]
    assert "tail -n 40 -f $HOME/adapter-jax-job/log" in err

    # --attach: no create, no setup, no second start: the polls, the report, the delete.
    gcloud = FakeGcloud(polls=(RUNNING, 0))
    _launch(tmp_path, gcloud, "--attach")
    assert gcloud.gcloud_verbs() == ["ssh", "ssh", "ssh", "rsync", "delete"]


def test_a_preempted_spot_vm_is_recreated_and_its_sweeps_restarted(tmp_path, capsys):
    # The queued resource is provisioned (ACTIVE), preempted (SUSPENDED: the poll fails), recreated.
    gcloud = FakeGcloud(polls=(RUNNING, "gcloud 1", RUNNING, 0), states=("ACTIVE", "SUSPENDED", "ACTIVE"))
    _launch(tmp_path, gcloud, "--spot", "--max_recoveries=1")
    verbs = gcloud.gcloud_verbs()
    setup = ["create", "describe", *SETUP[1:]]
    assert verbs == [*setup, "ssh", "ssh", "describe", "delete", *setup, "ssh", "ssh", "ssh", "rsync", "delete"]
    creates = [argv for argv in gcloud.calls if "create" in argv]
    assert all(argv[3] == "queued-resources" and "--spot" in argv for argv in creates)
    deletes = [argv for argv in gcloud.calls if "delete" in argv]
    assert all(argv[3] == "queued-resources" and "--force" in argv for argv in deletes)
    assert "was preempted (SUSPENDED): deleting and recreating it" in capsys.readouterr().out

    # Preempted once more than --max_recoveries allows: an error, and the VM goes.
    gcloud = FakeGcloud(polls=("gcloud 1",), states=("PREEMPTED",))
    with pytest.raises(launch.StepError, match="preempted \\(PREEMPTED\\) again, after --max_recoveries=0"):
        _launch(tmp_path, gcloud, "--preemptible", "--max_recoveries=0")
    assert gcloud.gcloud_verbs()[-1] == "delete"


def test_steps_before_the_run_are_retried_with_backoff(tmp_path):
    gcloud = FakeGcloud(fail_on="scripts.download_glue", fail_times=2)
    sleeps = _launch(tmp_path, gcloud, "--gcloud_retries=2")
    assert sleeps[:2] == [10, 20]
    assert gcloud.gcloud_verbs()[:8] == [*SETUP[:3], "ssh", "ssh", "ssh", "ssh", "ssh"]


def test_a_failing_step_stops_the_sequence_and_still_deletes(tmp_path):
    gcloud = FakeGcloud(fail_on="scripts.download_glue")
    with pytest.raises(launch.StepError, match=r"step 'download GLUE .*' failed \(exit 1\)"):
        _launch(tmp_path, gcloud, "--gcloud_retries=1")
    assert gcloud.gcloud_verbs() == ["create", "scp", "ssh", "ssh", "ssh", "delete"]


def test_a_failed_create_deletes_nothing(tmp_path):
    gcloud = FakeGcloud(fail_on="create")
    with pytest.raises(launch.StepError, match="create the TPU VM"):
        _launch(tmp_path, gcloud)
    assert len(gcloud.calls) == 1


def test_keep_leaves_the_vm_and_a_failed_delete_is_an_error(tmp_path):
    gcloud = FakeGcloud()
    _launch(tmp_path, gcloud, "--keep")
    assert "delete" not in gcloud.calls[-1]
    gcloud = FakeGcloud(polls=(1,))
    with pytest.raises(launch.StepError):
        _launch(tmp_path, gcloud, "--keep")
    assert "delete" not in gcloud.calls[-1]  # --keep holds on failure too
    with pytest.raises(launch.StepError, match="could not delete adapters-glue"):
        _launch(tmp_path, FakeGcloud(fail_on="delete"), "--gcloud_retries=0")


def test_pods_are_told_apart_from_one_host():
    assert [launch_flags.is_pod(t) for t in ("v4-8", "v5litepod-8", "v6e-8", "v4-16", "v5litepod-16")] == [
        False, False, False, True, True]
