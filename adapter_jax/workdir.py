"""A run's folder: the name of every file in it (and in a sweep's folder), files written whole or not at all,
by process 0 alone where the processes of a pod share them, and the lock that keeps one run per folder.

    <workdir>/config.json               the config the metrics history began with (validation compares a rerun)
    <workdir>/lock.json                 the run holding the workdir
    <workdir>/metrics.jsonl             the metrics history (on gs://, chunks metrics/<number>.jsonl)
    <workdir>/metrics.damaged.txt     damaged history lines a resume set aside, each group after its source
    <workdir>/tensorboard/              the same scalars as TensorBoard events
    <workdir>/checkpoints/              orbax steps; corrupt_checkpoints/ the steps that could not be read
    <workdir>/export/adapters.safetensors   the best-on-dev trained parameters
    <workdir>/submission/               GLUE test predictions; complete.json, written last, lists them
    <workdir>/summary.json              written last by training: the run is finished
    <workdir>/failure.json              a sweep's run that diverged
    <workdir>/logs/<host>.<pid>.log     every library's log lines
    <sweep>/results.jsonl, failures.jsonl, best.json, and one workdir per run
"""

import contextlib
import json
import os
import pathlib
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import jax
from absl import logging
from etils import epath

from adapter_jax import distributed
from adapter_jax.errors import DataError, PeerLost, WorkdirInUse, WriteFailed

EXPORT_FILE = "adapters.safetensors"  # in an export folder, a workdir's or one copied elsewhere
_LOCK_FILE = "lock.json"
_LOCK_BARRIER_TIMEOUT_S = 120  # the processes of a run reach the lock together, after reading the config alone


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is on an object store (gs://...), which has no append, rename or exclusive create."""
    return "://" in os.fspath(path)


def is_primary_process() -> bool:
    """Whether this process writes the files the processes of a run share: process 0 alone, so that a pod's
    hosts sharing a folder (a bucket) never write one file twice."""
    return jax.process_index() == 0


class Workdir:
    """The files of one run (the module doc lists them)."""

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(os.fspath(path))  # a Workdir is a path too

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    history_config = property(lambda self: self.path / "config.json")
    lock = property(lambda self: self.path / _LOCK_FILE)
    history_file = property(lambda self: self.path / "metrics.jsonl")  # where appending is possible
    history_chunks = property(lambda self: self.path / "metrics")  # on an object store, read in name order
    damaged_history = property(lambda self: self.path / "metrics.damaged.txt")  # lines a resume set aside
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    corrupt_checkpoints = property(lambda self: self.path / "corrupt_checkpoints")  # kept to look at
    export_dir = property(lambda self: self.path / "export")
    export_file = property(lambda self: self.export_dir / EXPORT_FILE)
    submission_dir = property(lambda self: self.path / "submission")
    submission_complete = property(lambda self: self.submission_dir / "complete.json")
    summary = property(lambda self: self.path / "summary.json")
    failure = property(lambda self: self.path / "failure.json")

    def log_file(self) -> pathlib.Path:
        """logs/<host>.<pid>.log, or in a local temporary folder where the workdir is a bucket."""
        folder = pathlib.Path(tempfile.gettempdir()) / "adapter-jax-logs"
        if not is_remote(self.path):
            folder = pathlib.Path(self.path).absolute() / "logs"
        return folder / f"{socket.gethostname()}.{os.getpid()}.log"


class SweepDir:
    """A sweep's folder: one workdir per run, and the files gathering them."""

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(path)

    results = property(lambda self: self.path / "results.jsonl")  # every finished run's summary
    failures = property(lambda self: self.path / "failures.jsonl")
    best = property(lambda self: self.path / "best.json")

    def run(self, name: str) -> Workdir:
        return Workdir(self.path / name)


def read_json(path: epath.PathLike) -> dict:
    """A JSON object from `path`; a file that is not one raises DataError naming it."""
    path = epath.Path(path)
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete it to redo what wrote it") from e
    if not isinstance(value, dict):
        raise DataError(f"{path} holds {type(value).__name__}, not a JSON object; delete it to redo what wrote it")
    return value


@contextlib.contextmanager
def writing(path: epath.PathLike) -> Iterator[None]:
    """Turns an OSError of writing `path` into WriteFailed naming the path and the reason."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(f"cannot write {path}: {e.strerror or e}") from e


def write_atomic(path: epath.PathLike, data: str | bytes) -> epath.Path:
    """Writes `path` whole or not at all, so that a kill leaves the old file or the new one, never a part; a
    failure raises WriteFailed and leaves no temporary file.

    A local file is written through a temporary file renamed over it. An object store (gs://) shows an object
    only once its upload is complete, so it is written directly: it has no rename (gcsfs would copy and delete).
    """
    path = epath.Path(path)
    with writing(path):
        if is_remote(path):
            _write(path, data)
            return path
        temporary = sibling_of_this_process(path, "tmp")
        try:
            _write(temporary, data)
            temporary.replace(path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
    return path


def write_shared(path: epath.PathLike, data: str | bytes) -> epath.Path:
    """`write_atomic` by process 0 alone (is_primary_process); returns the path on every process."""
    if is_primary_process():
        return write_atomic(path, data)
    return epath.Path(path)


def sibling_of_this_process(path: epath.Path, what: str) -> epath.Path:
    """A hidden file beside `path` that no other process writes: unique across the hosts of a pod sharing a
    folder (their process ids can coincide) and across the threads of one."""
    return path.with_name(f".{path.name}.{what}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write(path: epath.Path, data: str | bytes) -> None:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


class WorkdirLock:
    """One run per workdir: <workdir>/lock.json, created exclusively, names the holder (host, process id,
    start time) and is removed when the run ends. A lock left by a process of this host that is no longer
    running (killed, or a VM restarted after preemption) is taken over with a warning.

    On a pod every host runs the same workdir, so process 0 holds the lock for all of them; the others wait
    for it to be taken (PeerLost if process 0 stopped instead, e.g. on a busy workdir).
    """

    def __init__(self, workdir: epath.PathLike):
        self._path = Workdir(workdir).lock
        self._record = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": uuid.uuid4().hex,
        })
        self._held = False

    def __enter__(self) -> None:
        if is_primary_process():
            self._acquire()
        try:
            distributed.barrier(f"lock of {self._path.parent}", timeout_s=_LOCK_BARRIER_TIMEOUT_S)
        except PeerLost:
            self.__exit__()  # the run never starts: the lock must not outlive it
            raise

    def _acquire(self) -> None:
        with writing(self._path):
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if not self._create():
                holder = self._holder()
                if not self._is_stale(holder):
                    raise WorkdirInUse(
                        f"{self._path.parent} is in use by process {holder['pid']} on {holder['host']} (started "
                        f"{holder['started']}); wait for it to end, or use another workdir. If no run uses this "
                        f"workdir, delete {self._path}"
                    )
                logging.warning("Taking over %s from process %s on %s (started %s), which is no longer running.",
                                self._path, holder["pid"], holder["host"], holder["started"])
                self._take_over()
        self._held = True

    def _create(self) -> bool:
        if not is_remote(self._path):
            try:
                with open(os.fspath(self._path), "x") as f:  # epath opens no file exclusively; the OS does
                    f.write(self._record)
            except FileExistsError:
                return False
            return True
        # An object store creates nothing exclusively (not through epath): the last writer wins, and
        # reading the lock back tells each contender whether it was that writer.
        if self._path.exists():
            return False
        self._path.write_text(self._record)
        return self._path.read_text() == self._record

    def _holder(self) -> dict:
        holder = read_json(self._path)
        if not {"host", "pid", "started"} <= set(holder):
            raise DataError(f"lock file {self._path} does not name its holder; if no run uses this workdir, delete it")
        return holder

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        """Whether the holder is a process of this host that is not running. A process of another host is
        taken to be alive: this host cannot tell."""
        if holder["host"] != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():  # a restarted container reuses process ids; this one holds no lock yet
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _take_over(self) -> None:
        # Renaming the stale lock away first: of two runs taking over at once, one rename fails, and that
        # run then meets the other's new lock.
        stale = self._path.with_name(f"{_LOCK_FILE}.stale-{os.getpid()}")
        try:
            self._path.rename(stale)
        except FileNotFoundError:
            pass
        else:
            stale.unlink()
        if not self._create():
            holder = self._holder()
            raise WorkdirInUse(f"{self._path.parent} was taken by process {holder['pid']} on {holder['host']} first")

    def __exit__(self, *exc: object) -> None:
        if self._held and self._path.exists() and self._path.read_text() == self._record:
            self._path.unlink()
        self._held = False
