"""One run per workdir (and per sweep folder): <workdir>/lock.json, a lease its holder renews.

The record names the holder (host, process id, start time) and its heartbeat, which a background thread renews
every quarter of the lease. A lock whose heartbeat is older than its lease is stale, whichever host wrote it (a
spot VM is recreated under a new name; a SIGKILLed run renews nothing), as is one left by a process of this host
that is no longer running; a stale lock is taken over with a warning naming the old holder. The take-over
replaces the record only if it is still the one read (lease_store), so of two starters one wins.

On a pod every host runs the same workdir, so process 0 holds the lock for all of them; the others wait for it to
be taken (PeerLost if process 0 stopped instead, e.g. on a busy workdir). While the lock is held, SIGTERM and
SIGINT stop the run through an exception (stop_signals.raised), so that loading, compiling or predicting stopped
by a signal releases the lock too.
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from adapter_jax import distributed, stop_signals
from adapter_jax.errors import DataError, WorkdirInUse
from adapter_jax.lease_store import Stored, store_for
from adapter_jax.workdir import Workdir, is_primary_process, writing

LEASE_SECONDS = 120  # configs' lock_lease_seconds and the sweep's --lock_lease_seconds default to it
_LOCK_BARRIER_TIMEOUT_S = 120  # the processes of a run reach the lock together, after reading the config alone
# The record's keys and their types; heartbeat and lease_seconds are missing from locks written before leases.
_FIELDS = {"host": str, "pid": int, "started": str}
_LEASE_FIELDS = {"heartbeat": (int, float), "lease_seconds": (int, float)}


class WorkdirLock:
    """Holds <workdir>/lock.json while in its `with` block (the module doc says how)."""

    def __init__(self, workdir: epath.PathLike, lease_seconds: float = LEASE_SECONDS):
        self._path = Workdir(workdir).lock
        self._lease_seconds = lease_seconds
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}
        self._version = None  # of the record this run wrote last; None while it holds no lock
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> None:
        # Before the lock exists: a signal that comes once it does must release it.
        self._signals.enter_context(stop_signals.raised(self._path.parent))
        try:
            if is_primary_process():
                self._acquire()
            distributed.barrier(f"lock of {self._path.parent}", timeout_s=_LOCK_BARRIER_TIMEOUT_S)
        except BaseException:
            self.__exit__()  # the run never starts: the lock must not outlive it
            raise

    def _record(self) -> str:
        return json.dumps({**self._holder, "heartbeat": time.time(), "lease_seconds": self._lease_seconds})

    def _acquire(self) -> None:
        with writing(self._path):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._store = store_for(self._path)
            self._version = self._store.create(self._record())
            if self._version is None:
                found = self._store.read()
                if found is None:  # released since: start again
                    return self._acquire()
                self._take_over(found)
        self._heartbeat = threading.Thread(target=self._renew, name=f"lease of {self._path}", daemon=True)
        self._heartbeat.start()

    def _take_over(self, found: Stored) -> None:
        holder = _holder(self._path, found.text)
        why = self._why_stale(holder, found)
        if why is None:
            raise WorkdirInUse(
                f"{self._path.parent} is in use by process {holder['pid']} on {holder['host']} (started "
                f"{holder['started']}); wait for it to end, or use another workdir. If no run uses this "
                f"workdir, delete {self._path}"
            )
        self._version = self._store.replace(self._record(), found.version)
        if self._version is None:
            winner = self._store.read()
            winner_holder = _holder(self._path, winner.text) if winner else holder
            raise WorkdirInUse(f"{self._path.parent} was taken by process {winner_holder['pid']} on "
                               f"{winner_holder['host']} first")
        logging.warning("Taking over %s from process %s on %s (started %s), %s.", self._path, holder["pid"],
                        holder["host"], holder["started"], why)

    def _why_stale(self, holder: dict, found: Stored) -> str | None:
        """Why the lock of `holder` is stale (to name in the warning), or None if it is held."""
        if holder["host"] == socket.gethostname() and not _is_running(holder["pid"]):
            return "which is no longer running"
        age = time.time() - holder.get("heartbeat", found.modified)
        lease = holder.get("lease_seconds", self._lease_seconds)
        if age > lease:
            return f"whose last heartbeat is {age:.0f} s old (lease {lease:g} s)"
        return None

    def _renew(self) -> None:
        """The heartbeat, until released: a failed renewal is retried at the next beat, a lost lock reported."""
        while not self._stop_heartbeat.wait(self._lease_seconds / 4):
            try:
                version = self._store.renew(self._record(), self._version)
            except OSError as e:  # the storage did not answer: the next beat tries again
                logging.warning("Could not renew the lease of %s: %s", self._path, e)
                continue
            if version is None:
                logging.error("Lost the lock %s: another run took it over after this run's heartbeat was late; "
                              "stop this run, two runs now write the workdir", self._path)
                return
            self._version = version

    def __exit__(self, *exc: object) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._version is not None:
            self._store.delete(self._version)
            self._version = None
        self._signals.close()


def _holder(path: epath.Path, text: str) -> dict:
    """The lock record's holder; a record that is not one raises DataError naming the file and the key at fault."""
    fix = f"if no run uses this workdir, delete {path}"
    try:
        holder = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"lock file {path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(holder, dict):
        raise DataError(f"lock file {path} holds {type(holder).__name__}, not a JSON object; {fix}")
    for key, kind in {**_FIELDS, **_LEASE_FIELDS}.items():
        if key not in holder:
            if key in _FIELDS:
                raise DataError(f"lock file {path} has no {key!r}: it does not name its holder; {fix}")
        elif not isinstance(holder[key], kind) or isinstance(holder[key], bool):
            raise DataError(f"lock file {path}: {key!r} is {holder[key]!r}, not "
                            f"{'a number' if key in _LEASE_FIELDS else kind.__name__}; {fix}")
    return holder


def _is_running(pid: int) -> bool:
    """Whether process `pid` of this host runs. A restarted container may give this very process the id of the
    one that left the lock; the lease ends that lock all the same."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):  # no process can have such an id
        return False
    return True

