"""What a run needs around its loop: the metric writer, stop signals, and where log lines go."""

import json
import logging
import os
import pathlib
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
# Log lines written by code under these folders are the project's own; they reach the console.
_PROJECT_DIRS = tuple(
    str(pathlib.Path(__file__).resolve().parents[1] / name) + os.sep for name in ("adapter_jax", "scripts")
)


class MetricWriter:
    """Scalars to TensorBoard event files and a JSON-lines log in the workdir (process 0 only).

    The JSON-lines file is rewritten whole rather than appended to, since object stores such as
    gs:// cannot append; earlier lines (of a run that resumed) are kept.
    """

    def __init__(self, workdir: epath.Path):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            self._tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = workdir / METRICS_FILE
            self._lines = self._jsonl.read_text().splitlines() if self._jsonl.exists() else []

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._lines.append(json.dumps({"step": step, **scalars}))
        self._jsonl.write_text("\n".join(self._lines) + "\n")

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()


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


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, so that a log line does not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except (OSError, ValueError):  # a closed or broken console: logging's own report, and carry on
            self.handleError(record)


def _for_console(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(_PROJECT_DIRS)


def log_file_for(workdir: str) -> pathlib.Path:
    """<workdir>/logs/<host>.<pid>.log, or a local temporary folder where the workdir is a bucket."""
    folder = pathlib.Path(tempfile.gettempdir()) / "adapter-jax-logs"
    if "://" not in workdir:
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
    console = _ConsoleHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.addFilter(_for_console)
    root.addHandler(file_handler)
    root.addHandler(console)
    absl_logging.info("Full log: %s", log_file)
