"""A run's metrics history: every scalar the loop logs (training loss, learning rate, dev metrics) by step, as
JSON lines and TensorBoard events, kept through kills and resumes. Not GLUE's metrics (metrics.py), nor the
device metrics of one step (steps.py)."""

import json
import os
from collections.abc import Mapping

import tensorboardX
from absl import logging
from etils import epath

from adapter_jax.errors import DataError
from adapter_jax.workdir import (
    Workdir,
    is_primary_process,
    is_remote,
    write_atomic,
    writing,
)


def _is_record(line: str) -> bool:
    """Whether `line` is a whole history record: a JSON object with an integer step, ended by a newline (a line
    without one was cut short by a kill)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)


def _split(text: str, step: int) -> tuple[str, list[tuple[int, str]], bool]:
    """The lines of history `text` to keep, its damaged lines (line number, line), and whether it holds a
    record past `step`.

    Kept: the whole records up to `step` (steps only grow: the records from the first one past it are logged
    again by the resumed run). A damaged line is never the place to cut: the records after it are kept too.
    """
    kept, damaged, past = [], [], False
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if not _is_record(line):
            damaged.append((number, line))
        elif not past and json.loads(line)["step"] <= step:
            kept.append(line)
        else:
            past = True
    return "".join(kept), damaged, past


class HistoryWriter:
    """Scalars to TensorBoard event files and the run's history of JSON lines (process 0 only).

    Nothing is ever rewritten whole, so a kill cannot empty the history: locally each line is appended to
    the history file as it comes; on an object store, which cannot append, the lines since the last flush
    become a new chunk at each flush (each checkpoint). A resumed run first drops the lines past the step it
    resumed from, which it will log again, and sets every damaged line aside (Workdir.damaged_history) with a
    warning naming it.
    """

    def __init__(self, workdir: epath.PathLike, resumed_step: int):
        self._enabled = is_primary_process()
        if not self._enabled:
            return
        workdir = Workdir(workdir)
        self._damaged = workdir.damaged_history
        self._tensorboard = tensorboardX.SummaryWriter(str(workdir.tensorboard))
        self._remote = is_remote(workdir.path)
        self._pending: list[str] = []
        if self._remote:
            self._chunks = workdir.history_chunks
            self._next_chunk = self._truncate_chunks(resumed_step)
        else:
            self._jsonl = workdir.history_file
            self._truncate_file(resumed_step)

    def _truncate_file(self, step: int) -> None:
        if not self._jsonl.exists():
            return
        text = self._jsonl.read_bytes().decode("utf-8", errors="replace")
        kept, damaged, _ = _split(text, step)
        if damaged:  # set aside first: a kill before the rewrite leaves them in both files, never in neither
            self._set_aside(self._jsonl, damaged)
            write_atomic(self._jsonl, kept)
            return
        with writing(self._jsonl):  # cut in place: the lines kept are never rewritten
            os.truncate(os.fspath(self._jsonl), len(kept.encode("utf-8")))

    def _truncate_chunks(self, step: int) -> int:
        """Drops the lines past `step` from the chunks and sets damaged lines aside; returns the number of the
        next chunk."""
        chunks = sorted(self._chunks.glob("*.jsonl")) if self._chunks.exists() else []
        next_chunk = 0
        for chunk in chunks:
            text = chunk.read_text()
            kept, damaged, past = _split(text, step)
            if damaged:
                self._set_aside(chunk, damaged)
            if kept != text:
                if kept:
                    write_atomic(chunk, kept)
                else:
                    chunk.unlink()
            if kept:
                next_chunk = int(chunk.stem) + 1
            if past:  # every later record is logged again
                step = -1
        return next_chunk

    def _set_aside(self, path: epath.Path, damaged: list[tuple[int, str]]) -> None:
        """Appends the damaged lines of history file `path` to the workdir's file of set-aside lines, and says so."""
        aside = self._damaged
        header = json.dumps({"set_aside_from": str(path), "lines": [number for number, _ in damaged]}) + "\n"
        previous = aside.read_text() if aside.exists() else ""
        body = "".join(line if line.endswith("\n") else line + "\n" for _, line in damaged)
        write_atomic(aside, previous + header + body)
        numbers = ", ".join(str(number) for number, _ in damaged)
        logging.warning("%s: damaged line(s) %s (not whole JSON records) set aside in %s; the records around "
                        "them are kept", path, numbers, aside)

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


def read_history(workdir: epath.PathLike) -> list[dict]:
    """Every line of a run's history in order, from the history file or its chunks; a broken line raises
    DataError naming the file and line."""
    workdir = Workdir(workdir)
    files = [workdir.history_file] if workdir.history_file.exists() else []
    if workdir.history_chunks.exists():
        files += sorted(workdir.history_chunks.glob("*.jsonl"))
    records = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg})") from e
    return records
