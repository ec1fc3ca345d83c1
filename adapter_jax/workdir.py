"""A run's folder: the name of every file in it (and in a sweep's folder), files written whole or not at all,
by process 0 alone where the processes of a pod share them (lock.py holds the lock that keeps one run per folder).

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
import uuid
from collections.abc import Iterator

import jax
from etils import epath

from adapter_jax.errors import DataError, WriteFailed

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
