"""Training checkpoints (orbax): what a run needs to continue and nothing it can rebuild.

A checkpoint holds the training state (trainable parameters, optimizer state, step, RNG) and JSON
metadata (data-iterator position, the loop's progress, the config). Frozen weights come back from
the base model, so checkpoints of an adapter run are a few MB. orbax reads tensors only, so
restoring never unpickles anything.
"""

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from adapter_jax.errors import CheckpointError, WriteFailed
from adapter_jax.workdir import Workdir, is_primary_process

T = TypeVar("T")


def checkpoint_manager(workdir: epath.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax manager of the workdir's checkpoints; orbax writes each step to a temporary folder and
    renames it when complete, so a step that is listed is never half-written."""
    return ocp.CheckpointManager(
        Workdir(workdir).checkpoints,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False
) -> None:
    """Saves a host pytree `state` and JSON `meta` (iterator position, best result, config); a failed write,
    of this step or of the one before it in the background, raises WriteFailed."""
    with _save_errors(manager):
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=force,
        )


def raise_save_errors(manager: ocp.CheckpointManager) -> None:
    """Raises WriteFailed, and removes the step's temporary folder, if a background save failed: training
    on would only lose more work, and the traceback of orbax's worker thread names no reason one can act on."""
    with _save_errors(manager):
        manager.check_for_errors()


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for a save still in the background and closes `manager`; a failed save raises WriteFailed."""
    with _save_errors(manager):
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
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for index, step in enumerate(steps):
        try:
            return step, read(step)
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            problem = f"cannot read {what} of checkpoint step {step} in {manager.directory}: {type(e).__name__}: {e}"
            if index + 1 == len(steps):
                raise CheckpointError(problem) from e
            logging.warning("%s; falling back to step %d", problem, steps[index + 1])
    return None


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
    corrupt = [s for s in manager.all_steps() if s > step]
    if corrupt and is_primary_process():
        aside = Workdir(manager.directory.parent).corrupt_checkpoints
        aside.mkdir(parents=True, exist_ok=True)
        for bad in corrupt:
            (manager.directory / str(bad)).rename(aside / f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
        manager.reload()
    return restored.state, restored.meta


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    """The JSON metadata of the newest readable checkpoint, without reading its arrays; None if there is none."""
    found = _newest_intact(
        manager, lambda step: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta,
        "the metadata",
    )
    return None if found is None else dict(found[1])
