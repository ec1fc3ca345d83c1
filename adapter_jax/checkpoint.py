"""Training checkpoints (orbax): what a run needs to continue and nothing it can rebuild.

A checkpoint holds the training state (trainable parameters, optimizer state, step, RNG) and JSON
metadata (data-iterator position, the loop's progress, the config). Frozen weights come back from
the base model, so checkpoints of an adapter run are a few MB. orbax reads tensors only, so
restoring never unpickles anything.

Storage can stop answering (a bucket whose requests hang; tensorstore retries on): a save, restore or commit that
takes longer than the run's storage deadline ends the process with an `error:` line naming the path, on every
process of a pod alike (each has its own deadline), so that whatever restarts the run resumes it from the last
complete checkpoint, instead of every host waiting, billed, for hours.
"""

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from adapter_jax import distributed, logs
from adapter_jax.errors import CheckpointError, WriteFailed
from adapter_jax.workdir import Workdir, is_primary_process

T = TypeVar("T")
DEADLINE_MINUTES = 10.0  # configs' storage_deadline_minutes
# Of an error's message, what the console shows: tensorstore's add their whole spec, dozens of lines.
_SHORT_REASON_CHARS = 300


class CheckpointManager(ocp.CheckpointManager):
    """orbax's manager, with the storage deadline of its run."""

    def __init__(self, directory: epath.Path, *, options: ocp.CheckpointManagerOptions, deadline_minutes: float):
        super().__init__(directory, options=options)
        self.deadline_minutes = deadline_minutes


def checkpoint_manager(
    workdir: epath.PathLike, *, max_to_keep: int = 2, deadline_minutes: float = DEADLINE_MINUTES
) -> CheckpointManager:
    """An orbax manager of the workdir's checkpoints; orbax writes each step to a temporary folder and
    renames it when complete, so a step that is listed is never half-written."""
    return CheckpointManager(
        Workdir(workdir).checkpoints,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        deadline_minutes=deadline_minutes,
    )


@contextlib.contextmanager
def storage_deadline(minutes: float, what: str) -> Iterator[None]:
    """Ends the process (exit status 1, after an `error:` line naming `what`, which names the path) if the block
    takes longer than `minutes`: a thread stuck in a storage call cannot be stopped any other way. The lock is
    left to its lease."""

    def expire() -> None:
        message = (f"error: {what} did not finish within {minutes:g} minutes (config.storage_deadline_minutes): "
                   f"the storage stopped answering. Stopping; rerun to resume from the last complete checkpoint.")
        for stream in {logs.console(), sys.stderr}:  # the console, and the log file once logs.route_logs ran
            print(message, file=stream, flush=True)
        os._exit(1)

    timer = threading.Timer(minutes * 60, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _deadline(manager: CheckpointManager, what: str) -> contextlib.AbstractContextManager[None]:
    return storage_deadline(manager.deadline_minutes, f"{what} {manager.directory}")


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False
) -> None:
    """Saves a host pytree `state` and JSON `meta` (iterator position, best result, config); a failed write,
    of this step or of the one before it in the background, raises WriteFailed."""
    with _deadline(manager, "saving a checkpoint to"), _save_errors(manager):
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=force,
        )


def raise_save_errors(manager: ocp.CheckpointManager, *, wait: bool = False) -> None:
    """Raises WriteFailed, and removes the step's temporary folder, if a background save failed: training
    on would only lose more work, and the traceback of orbax's worker thread names no reason one can act on.
    With `wait`, the save still in the background is waited for first, so that a failed one stops the run
    before anything else is written (an export would fail on a full disk too, and hide the cause)."""
    with _deadline(manager, "writing a checkpoint to"), _save_errors(manager):
        if wait:
            manager.wait_until_finished()
        manager.check_for_errors()


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for a save still in the background and closes `manager`; a failed save raises WriteFailed."""
    with _deadline(manager, "writing a checkpoint to"), _save_errors(manager):
        manager.close()


@contextlib.contextmanager
def _save_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Turns a failed save into WriteFailed naming the folder and the reason, and removes its temporary folder."""
    try:
        yield
    except Exception as e:  # orbax passes on whatever the writer raised
        _remove_temporary(manager)
        raise WriteFailed(f"cannot write a checkpoint to {manager.directory}: {_reason(e)}") from e


def _reason(error: BaseException) -> str:
    """Why a write failed, as the OS says it (e.g. "No space left on device"): the first OSError among `error`
    and its causes, or the OS error code in the message of tensorstore (which writes orbax's arrays)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        code = re.search(r"os_error_code='(\d+)'", str(cause))
        if code:
            return os.strerror(int(code.group(1)))
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {error}"


def _remove_temporary(manager: ocp.CheckpointManager) -> None:
    for name in ocp.path.step.tmp_checkpoints(manager.directory):
        (manager.directory / name).rmtree(missing_ok=True)


def _newest_intact(manager: ocp.CheckpointManager, read: Callable[[int], T], what: str) -> tuple[int, T] | None:
    """(step, read(step)) for the newest step that `read` can read; None if there are no steps.

    A step orbax lists was renamed into place complete, but its files can still be damaged later (a disk
    error, a hand-made copy cut short): it is skipped with a warning, and moved out of the way by `restore`.

    On a pod every process tries the same steps, process 0's list, and takes a step only if every process read
    it: they restore the same step, and their saves agree on what is there.
    """
    steps = distributed.from_process_0(sorted(manager.all_steps(), reverse=True))
    for index, step in enumerate(steps):
        error = None
        try:
            with _deadline(manager, f"reading step {step} of"):
                value = read(step)
        # orbax raises many types; the user needs the path and the cause, and every process the same decision.
        except Exception as e:  # noqa: BLE001 - raised below once the processes agree, or logged and skipped
            error = e
        if not distributed.on_any_process(error is not None):
            return step, value
        reason = f"{type(error).__name__}: {_short(error)}" if error is not None else "on another process"
        problem = f"cannot read {what} of checkpoint step {step} in {manager.directory}: {reason}"
        if error is not None:
            logging.info("The error reading step %d in full: %s", step, error)
        if index + 1 == len(steps):
            raise CheckpointError(f"{problem} (details in the log file)") from error
        logging.warning("%s; falling back to step %d (details in the log file)", problem, steps[index + 1])
    return None


def _short(error: BaseException) -> str:
    """`error`'s message on one line: its first line, without tensorstore's spec, cut short."""
    message = str(error).split(" [tensorstore_spec=")[0].split("\n")[0]
    return message if len(message) <= _SHORT_REASON_CHARS else message[: _SHORT_REASON_CHARS - 3] + "..."


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest intact checkpoint shaped like `abstract_state`; None if there is none.

    Newer steps that cannot be read are moved to the workdir's corrupt_checkpoints, so that the run can save
    those steps again and one can still look at them.
    """
    found = _newest_intact(
        manager,
        lambda step: manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        ),
        "the state",
    )
    if found is None:
        return None
    step, restored = found
    corrupt = distributed.from_process_0([s for s in manager.all_steps() if s > step])
    if corrupt:
        if is_primary_process():
            aside = Workdir(manager.directory.parent).corrupt_checkpoints
            aside.mkdir(parents=True, exist_ok=True)
            for bad in corrupt:
                (manager.directory / str(bad)).rename(aside / f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
        distributed.barrier("damaged checkpoints moved aside")
        manager.reload()  # on every process: one that still listed a moved step would save differently
    return restored.state, restored.meta


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    """The JSON metadata of the newest readable checkpoint, without reading its arrays; None if there is none."""
    found = _newest_intact(
        manager, lambda step: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta,
        "the metadata",
    )
    return None if found is None else dict(found[1])
