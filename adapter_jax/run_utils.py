"""What a run needs around its loop: absolute paths, the workdir's lock, the metric writer, files written
whole or not at all, stop signals, and where log lines go."""

import argparse
import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np
import tensorboardX
from absl import flags
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from adapter_jax import distributed
from adapter_jax.errors import DataError, PeerLost, WorkdirInUse, WriteFailed

METRICS_FILE = "metrics.jsonl"
# On an object store the history is chunks of lines, <workdir>/metrics/<number>.jsonl, read in name order.
METRICS_CHUNK_DIR = "metrics"
CONFIG_FILE = "config.json"  # the config the workdir's history was started with
LOCK_FILE = "lock.json"
_LOCK_BARRIER_TIMEOUT_S = 120  # the processes of a run reach the lock together, after reading the config alone
_ORBAX_DIR = f"{os.sep}orbax{os.sep}"
# Log lines written by code under these folders are the project's own; they reach the console.
_PROJECT_DIRS = tuple(
    str(pathlib.Path(__file__).resolve().parents[1] / name) + os.sep for name in ("adapter_jax", "scripts")
)


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is on an object store (gs://...), which has no append, rename or exclusive create."""
    return "://" in os.fspath(path)


def absolute_path(value: str) -> str:
    """A path flag's (or argparse argument's) value made absolute against the current folder (a bucket path as it is).

    orbax refuses relative paths, and a path stored in a results file must mean the same from any
    folder; an empty value (an unset shell variable) would silently mean the current folder.
    """
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value if is_remote(value) else os.path.abspath(os.path.expanduser(value))


# Config keys that name local or bucket folders (not `model`, which may name a hub model).
CONFIG_PATH_KEYS = ("glue_dir", "tfds_data_dir")


def make_config_paths_absolute(config: ml_collections.ConfigDict) -> None:
    """Makes the config's data folders absolute, as path flags are (an empty tfds_data_dir means TFDS's own)."""
    for key in CONFIG_PATH_KEYS:
        if config.get(key):
            config[key] = absolute_path(config[key])


class _PathParser(flags.ArgumentParser):
    syntactic_help = "a path; relative paths are taken from the current folder"

    def parse(self, argument: str) -> str:
        try:
            return absolute_path(argument)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from e  # what absl reports as a bad flag value

    def flag_type(self) -> str:
        return "path"


def define_path_flag(name: str, default: str | None, help_text: str, *, multi: bool = False, **kwargs: Any) -> None:
    """An absl string flag (repeatable with `multi`) whose values are made absolute when parsed, and may not be empty."""
    if multi:
        flags.DEFINE_multi(_PathParser(), flags.ArgumentSerializer(), name, default, help_text, **kwargs)
    else:
        flags.DEFINE(_PathParser(), name, default, help_text, serializer=flags.ArgumentSerializer(), **kwargs)


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
        self._path = epath.Path(workdir) / LOCK_FILE
        self._record = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": uuid.uuid4().hex,
        })
        self._held = False

    def __enter__(self) -> None:
        if jax.process_index() == 0:
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
                absl_logging.warning("Taking over %s from process %s on %s (started %s), which is no longer running.",
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
        stale = self._path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
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


def _kept_prefix(text: str, step: int) -> int:
    """How many characters of JSON lines `text` to keep: the whole lines up to `step` (steps only grow), and
    none after a broken line (one cut short by a kill)."""
    kept = 0
    for line in text.splitlines(keepends=True):
        try:
            if not line.endswith("\n") or json.loads(line)["step"] > step:
                break
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        kept += len(line)
    return kept


class MetricWriter:
    """Scalars to TensorBoard event files and the run's history of JSON lines (process 0 only).

    Nothing is ever rewritten whole, so a kill cannot empty the history: locally each line is appended to
    metrics.jsonl as it comes; on an object store, which cannot append, the lines since the last flush
    become a new object metrics/<number>.jsonl at each flush (each checkpoint). A resumed run first drops
    the lines past the step it resumed from, which it will log again, and a broken last line.
    """

    def __init__(self, workdir: epath.PathLike, resumed_step: int):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        workdir = epath.Path(workdir)
        self._tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
        self._remote = is_remote(workdir)
        self._pending: list[str] = []
        if self._remote:
            self._chunks = workdir / METRICS_CHUNK_DIR
            self._next_chunk = self._truncate_chunks(resumed_step)
        else:
            self._jsonl = workdir / METRICS_FILE
            self._truncate_file(resumed_step)

    def _truncate_file(self, step: int) -> None:
        if not self._jsonl.exists():
            return
        text = self._jsonl.read_bytes().decode("utf-8", errors="replace")
        with writing(self._jsonl):  # cut in place: the lines kept are never rewritten
            os.truncate(os.fspath(self._jsonl), len(text[: _kept_prefix(text, step)].encode("utf-8")))

    def _truncate_chunks(self, step: int) -> int:
        """Drops the lines past `step` from the chunks; returns the number of the next chunk."""
        chunks = sorted(self._chunks.glob("*.jsonl")) if self._chunks.exists() else []
        for index, chunk in enumerate(chunks):
            text = chunk.read_text()
            kept = _kept_prefix(text, step)
            if kept < len(text):
                if kept:
                    write_atomic(chunk, text[:kept])
                    index += 1
                for later in chunks[index:]:
                    later.unlink()
                return int(chunks[index - 1].stem) + 1 if index else 0
        return int(chunks[-1].stem) + 1 if chunks else 0

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        line = json.dumps({"step": step, **scalars}) + "\n"
        if self._remote:
            self._pending.append(line)
            return
        with writing(self._jsonl), self._jsonl.open("a") as f:
            f.write(line)

    def flush(self) -> None:
        """Writes the pending lines (object stores only: elsewhere every line is written at once)."""
        if not self._enabled or not self._pending:
            return
        chunk = self._chunks / f"{self._next_chunk:06d}.jsonl"
        self._chunks.mkdir(parents=True, exist_ok=True)
        write_atomic(chunk, "".join(self._pending))
        self._pending.clear()
        self._next_chunk += 1

    def close(self) -> None:
        if self._enabled:
            self.flush()
            self._tensorboard.close()


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    """Every line of a run's history in order, from metrics.jsonl or its chunks; a broken line raises
    DataError naming the file and line."""
    workdir = epath.Path(workdir)
    files = [workdir / METRICS_FILE] if (workdir / METRICS_FILE).exists() else []
    if (workdir / METRICS_CHUNK_DIR).exists():
        files += sorted((workdir / METRICS_CHUNK_DIR).glob("*.jsonl"))
    records = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg})") from e
    return records


class StopSignals:
    """Turns SIGTERM (sent before a TPU VM is preempted) and SIGINT into a flag the loop polls."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def stop_requested(self, step: int, every_steps: int) -> bool:
        """Whether to stop after `step`. On a pod, all hosts must save the same step, so they agree
        every `every_steps` steps: a signal that reached any host stops them all."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % every_steps:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.received is not None)).any())

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


_console_stream: TextIO | None = None


def console() -> TextIO:
    """The terminal's stream: the progress bar, our own lines and errors. Once route_logs has run, sys.stderr
    is the log file (what libraries print there is theirs, not the user's), and this stays the terminal."""
    return _console_stream or sys.stderr


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, so that a log line does not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=console())
        except (OSError, ValueError):  # a closed or broken console: logging's own report, and carry on
            self.handleError(record)


def _for_console(record: logging.LogRecord) -> bool:
    if record.pathname.startswith(_PROJECT_DIRS):
        return True
    # orbax logs a failed background save with several tracebacks; the failure reaches the loop as an
    # exception too, which main reports in one line. The log file keeps orbax's account.
    orbax_error = record.levelno >= logging.ERROR and _ORBAX_DIR in record.pathname
    # We run no event loop of our own: asyncio's reports ("Task exception was never retrieved") are about
    # orbax's background writes, already reported as that one line.
    return record.levelno >= logging.WARNING and not orbax_error and record.name != "asyncio"


def log_file_for(workdir: str) -> pathlib.Path:
    """<workdir>/logs/<host>.<pid>.log, or a local temporary folder where the workdir is a bucket."""
    folder = pathlib.Path(tempfile.gettempdir()) / "adapter-jax-logs"
    if not is_remote(workdir):
        folder = pathlib.Path(workdir).absolute() / "logs"
    return folder / f"{socket.gethostname()}.{os.getpid()}.log"


def route_logs(log_file: pathlib.Path) -> None:
    """Every library's INFO lines go to `log_file`; the console shows the project's own lines and
    everyone's warnings (orbax alone writes dozens of INFO lines per checkpoint)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(absl_logging.PythonFormatter())
    console_handler = _ConsoleHandler()
    console_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console_handler.addFilter(_for_console)
    root.addHandler(file_handler)
    root.addHandler(console_handler)
    logging.captureWarnings(True)  # Python warnings as log records: on the console, as every warning is
    # Native threads print Python tracebacks to sys.stderr themselves: after a failed checkpoint write,
    # tensorstore's in-flight writes report dozens of "Event loop is closed" as they land. They go to the log.
    global _console_stream
    if _console_stream is None:
        _console_stream = sys.stderr
    sys.stderr = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open as long as the process
    absl_logging.info("Full log: %s", log_file)
