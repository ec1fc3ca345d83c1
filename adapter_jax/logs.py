"""Where log lines go: the console shows the project's own lines and everyone's warnings; a log file gets
every library's INFO lines (orbax alone writes dozens per checkpoint)."""

import logging
import os
import pathlib
import sys
from typing import TextIO

from absl import logging as absl_logging
from tqdm import tqdm

_ORBAX_DIR = f"{os.sep}orbax{os.sep}"
# Log lines written by code under these folders are the project's own; they reach the console.
_PROJECT_DIRS = tuple(
    str(pathlib.Path(__file__).resolve().parents[1] / name) + os.sep for name in ("adapter_jax", "scripts")
)
_console_stream: TextIO | None = None
_routed_file: pathlib.Path | None = None


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
    # exception too, which the entry point reports in one line. The log file keeps orbax's account.
    orbax_error = record.levelno >= logging.ERROR and _ORBAX_DIR in record.pathname
    # We run no event loop of our own: asyncio's reports ("Task exception was never retrieved") are about
    # orbax's background writes, already reported as that one line.
    return record.levelno >= logging.WARNING and not orbax_error and record.name != "asyncio"


def routed_file() -> pathlib.Path | None:
    """The log file route_logs sends every log line and sys.stderr to; None before it has run."""
    return _routed_file


def route_logs(log_file: pathlib.Path) -> None:
    """Every library's INFO lines go to `log_file`; the console shows the project's own lines and
    everyone's warnings."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Opened first, so that a workdir that cannot be written stops here with the logging untouched.
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    file_handler.setFormatter(absl_logging.PythonFormatter())
    console_handler = _ConsoleHandler()
    console_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console_handler.addFilter(_for_console)
    root.addHandler(file_handler)
    root.addHandler(console_handler)
    logging.captureWarnings(True)  # Python warnings as log records: on the console, as every warning is
    # Native threads print Python tracebacks to sys.stderr themselves: after a failed checkpoint write,
    # tensorstore's in-flight writes report dozens of "Event loop is closed" as they land. They go to the log.
    global _console_stream, _routed_file
    _routed_file = log_file
    if _console_stream is None:
        _console_stream = sys.stderr
    sys.stderr = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open as long as the process
    absl_logging.info("Full log: %s", log_file)
