"""Training checkpoints (orbax): what a run needs to continue and nothing it can rebuild.

A checkpoint holds the training state (trainable parameters, optimizer state, step, RNG) and JSON
metadata (data-iterator position, the loop's progress, the config). Frozen weights come back from
the base model, so checkpoints of an adapter run are a few MB. orbax reads tensors only, so
restoring never unpickles anything.
"""

from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from adapter_jax.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"  # under the workdir


def checkpoint_manager(workdir: epath.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax manager of <workdir>/checkpoints; orbax writes each step to a temporary folder and
    renames it when complete, so a step that is listed is never half-written."""
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False
) -> None:
    """Saves a host pytree `state` and JSON `meta` (iterator position, best result, config)."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
        force=force,
    )


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the latest checkpoint shaped like `abstract_state`; None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise CheckpointError(
            f"cannot restore checkpoint step {step} from {manager.directory}: {type(e).__name__}: {e}"
        ) from e
    return restored.state, restored.meta


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    """The JSON metadata of the latest checkpoint, without reading its arrays; None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise CheckpointError(
            f"cannot read the metadata of checkpoint step {step} in {manager.directory}: {type(e).__name__}: {e}"
        ) from e
