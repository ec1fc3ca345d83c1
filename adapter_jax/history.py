"""A run's metrics history: every scalar the loop logs (training loss, learning rate, dev metrics) by step, as
JSON lines and TensorBoard events, kept through kills and resumes. Not GLUE's metrics (metrics.py), nor the
device metrics of one step (steps.py)."""

import json
import os
from collections.abc import Mapping

import tensorboardX
from etils import epath

from adapter_jax.errors import DataError
from adapter_jax.workdir import (
    Workdir,
    is_primary_process,
    is_remote,
    write_atomic,
    writing,
)


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


class HistoryWriter:
    """Scalars to TensorBoard event files and the run's history of JSON lines (process 0 only).

    Nothing is ever rewritten whole, so a kill cannot empty the history: locally each line is appended to
    the history file as it comes; on an object store, which cannot append, the lines since the last flush
    become a new chunk at each flush (each checkpoint). A resumed run first drops the lines past the step it
    resumed from, which it will log again, and a broken last line.
    """

    def __init__(self, workdir: epath.PathLike, resumed_step: int):
        self._enabled = is_primary_process()
        if not self._enabled:
            return
        workdir = Workdir(workdir)
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
