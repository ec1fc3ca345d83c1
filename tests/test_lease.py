"""The workdir lock as a lease (adapter_jax/lock.py): stale whichever host wrote it, renewed while held, taken over
by one starter alone, on a local disk and on the Cloud Storage emulator; and, through the real entry point,
released by a signal during loading, or taken over after a SIGKILL once its lease has run out."""

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import pytest
from etils import epath

from adapter_jax.errors import DataError, Preempted, WorkdirInUse
from adapter_jax.lock import WorkdirLock
from adapter_jax.workdir import Workdir
from tests.conftest import GCS_BUCKET
from tests.test_cli_robustness import _command, _console, _run, _start, _wait_for


def _lock_record(host="spot-vm-old", pid=4242, heartbeat_age=0.0, lease=120, **more):
    return json.dumps({"host": host, "pid": pid, "started": "yesterday", "token": "t",
                       "heartbeat": time.time() - heartbeat_age, "lease_seconds": lease, **more})


@pytest.fixture(params=["local", "bucket"])
def workdir(request, tmp_path) -> epath.Path:
    if request.param == "local":
        return epath.Path(tmp_path / "run")
    request.getfixturevalue("gcs_env")
    return epath.Path(f"gs://{GCS_BUCKET}/{tmp_path.name}/run")


def _write_lock(workdir: epath.Path, text: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    Workdir(workdir).lock.write_text(text)


def test_an_expired_lease_of_another_host_is_taken_over_naming_the_old_holder(workdir, caplog):
    _write_lock(workdir, _lock_record(heartbeat_age=200))
    with caplog.at_level(logging.WARNING), WorkdirLock(workdir):
        held = json.loads(Workdir(workdir).lock.read_text())
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    assert re.search(r"Taking over .*lock.json from process 4242 on spot-vm-old \(started yesterday\), whose last "
                     r"heartbeat is 2\d\d s old \(lease 120 s\)", caplog.text), caplog.text
    assert not Workdir(workdir).lock.exists()


def test_a_live_lease_of_another_host_refuses_and_is_left_alone(workdir):
    record = _lock_record(heartbeat_age=60)
    _write_lock(workdir, record)
    with pytest.raises(WorkdirInUse, match=r"in use by process 4242 on spot-vm-old \(started yesterday\)"), \
            WorkdirLock(workdir):
        pass
    assert Workdir(workdir).lock.read_text() == record


def test_the_holder_renews_its_heartbeat_so_its_lease_never_runs_out(tmp_path):
    with WorkdirLock(tmp_path, lease_seconds=1):
        first = json.loads(Workdir(tmp_path).lock.read_text())["heartbeat"]
        time.sleep(1.6)
        with pytest.raises(WorkdirInUse), WorkdirLock(tmp_path, lease_seconds=1):
            pass  # held past its lease, but renewed
        assert json.loads(Workdir(tmp_path).lock.read_text())["heartbeat"] > first + 1


@pytest.mark.parametrize("key, value, says", [
    ("pid", "abc", "'pid' is 'abc', not int"),
    ("host", 7, "'host' is 7, not str"),
    ("heartbeat", "soon", "'heartbeat' is 'soon', not a number"),
])
def test_lock_metadata_of_the_wrong_type_is_one_line_naming_file_and_key(tmp_path, key, value, says):
    _write_lock(epath.Path(tmp_path), _lock_record(**{key: value}))
    with pytest.raises(DataError) as raised, WorkdirLock(tmp_path):
        pass
    message = str(raised.value)
    assert message.startswith(f"lock file {tmp_path / 'lock.json'}: {says}; ") and "\n" not in message, message
    assert "delete" in message


def _race_four_starters(workdir: epath.Path) -> tuple[list, list, list]:
    """Four threads, each a starter of its own, enter the lock at once: (won, refused, failed)."""
    start, won, refused, failed = threading.Barrier(4), [], [], []

    def starter():
        lock = WorkdirLock(workdir)
        start.wait()
        try:
            lock.__enter__()
        except WorkdirInUse:
            refused.append(lock)
            return
        except Exception as e:  # noqa: BLE001 -- any other error is the failure to show
            failed.append(e)
            return
        won.append(lock)

    threads = [threading.Thread(target=starter) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused, failed


def test_of_starters_racing_for_a_stale_lock_exactly_one_wins(workdir):
    """A pod of hosts would race as processes; threads race the same way. The race is run several times: a wrong
    store lets two win, or one read a record half written, only in some of them."""
    rounds = 10 if workdir.as_posix().startswith("/") else 2  # the emulator answers slowly
    for _ in range(rounds):
        _write_lock(workdir, _lock_record(heartbeat_age=500))
        won, refused, failed = _race_four_starters(workdir)
        assert (len(won), len(refused), failed) == (1, 3, [])
        holder = json.loads(Workdir(workdir).lock.read_text())
        won[0].__exit__()
        assert holder["token"] == won[0]._holder["token"]
        assert not Workdir(workdir).lock.exists()


def test_a_signal_while_the_lock_is_held_releases_it(tmp_path):
    with pytest.raises(Preempted, match=f"stopped by SIGTERM \\({tmp_path} released\\)"), WorkdirLock(tmp_path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert not Workdir(tmp_path).lock.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# A stand-in for the VM a spot preemption recreates: the same command under another hostname.
OTHER_HOST = "import runpy, socket, sys; socket.gethostname = lambda: 'recreated-vm'; sys.argv.pop(0); " \
             "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"


@pytest.mark.slow  # the entry point in subprocesses
def test_a_run_stopped_while_loading_releases_its_lock_and_one_killed_is_taken_over_after_its_lease(
    tiny_model_dir, tiny_glue_dir, tmp_path
):
    workdir = tmp_path / "run"
    command = _command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, "--config.lock_lease_seconds=2")
    lock = Workdir(workdir).lock
    stopped = _start(command, tmp_path / "stopped.log")
    _wait_for(lock.exists, stopped)  # taken after validation: the model is loading, the steps to compile
    stopped.send_signal(signal.SIGTERM)
    stopped.wait(timeout=120)
    output = stopped.log_path.read_text()
    assert stopped.returncode == 128 + signal.SIGTERM, output
    assert f"stopped by SIGTERM ({workdir} released). Rerun the same command to resume." in output
    assert "Traceback" not in output and not lock.exists()

    killed = _start(command, tmp_path / "killed.log")
    _wait_for(lock.exists, killed)
    killed.kill()
    killed.wait()
    assert json.loads(lock.read_text())["pid"] == killed.pid
    time.sleep(2)  # the lease runs out
    rerun = _run([sys.executable, "-c", OTHER_HOST, *command[3:]])
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(rf"Taking over {lock} from process {killed.pid} on {socket.gethostname()} \(started .*\), whose "
                     r"last heartbeat is \d+ s old \(lease 2 s\)", rerun.stderr), rerun.stderr
    assert (workdir / "summary.json").exists() and not lock.exists()


@pytest.mark.slow  # the entry point in a subprocess
def test_a_lock_whose_pid_is_not_a_number_stops_the_entry_point_with_one_line(tiny_model_dir, tiny_glue_dir,
                                                                               tmp_path):
    _write_lock(epath.Path(tmp_path), _lock_record(host=socket.gethostname(), pid="abc"))
    result = _run(_command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir))
    assert result.returncode == 2, result.stderr
    lock = tmp_path / "lock.json"
    expected = f"error: lock file {lock}: 'pid' is 'abc', not int; if no run uses this workdir, delete {lock}"
    assert _console(result.stderr) == [expected]
