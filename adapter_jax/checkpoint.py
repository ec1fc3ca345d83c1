"""Training checkpoints (orbax) and the adapter-only export.

A training checkpoint holds what a run needs to continue and nothing it can rebuild: the
trainable parameters, optimizer state, step, RNG and data-iterator position. Frozen weights
come back from the base model, so checkpoints of an adapter run are a few MB.

The export is one safetensors file: the trained parameters plus, in its header, the settings
and base-model fingerprint they belong to. safetensors holds tensors only, so loading an
export (or a checkpoint) never unpickles anything.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
from etils import epath
from flax import traverse_util

from adapter_jax.errors import CheckpointError

EXPORT_FILE = "adapters.safetensors"
_METADATA_KEY = "adapter_jax"
_SEPARATOR = "/"


def checkpoint_manager(directory: epath.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax manager; orbax writes each step to a temporary folder and renames it when complete,
    so a step that is listed is never half-written."""
    return ocp.CheckpointManager(
        epath.Path(directory),
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


def fingerprint(params: Mapping[str, Any]) -> str:
    """sha256 over every tensor's path, dtype, shape and bytes: identifies a base model's weights."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
        array = np.asarray(leaf)
        digest.update(_SEPARATOR.join(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def export_adapters(directory: epath.PathLike, params: Mapping[str, Any], metadata: Mapping[str, Any]) -> epath.Path:
    """Writes the trained parameters and their settings to `<directory>/adapters.safetensors`, atomically."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        _SEPARATOR.join(path): np.asarray(jax.device_get(leaf))
        for path, leaf in traverse_util.flatten_dict(params).items()
    }
    data = safetensors.numpy.save(tensors, metadata={_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    target = directory / EXPORT_FILE
    temporary = directory / f".{EXPORT_FILE}.tmp-{os.getpid()}"
    temporary.write_bytes(data)
    temporary.replace(target)
    return target


def load_adapters(path: epath.PathLike) -> tuple[dict, dict]:
    """Reads an export written by `export_adapters`: (nested params, metadata)."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / EXPORT_FILE
    if not path.exists():
        raise CheckpointError(f"adapter export not found: {path}")
    try:
        data = path.read_bytes()
        tensors = safetensors.numpy.load(data)
        header = _read_header(data)
        metadata = json.loads(header[_METADATA_KEY])
    except (KeyError, ValueError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"adapter export {path} is corrupt or not an adapter-jax export: {e}") from e
    params = traverse_util.unflatten_dict({tuple(k.split(_SEPARATOR)): v for k, v in tensors.items()})
    return params, metadata


def _read_header(data: bytes) -> dict:
    """The safetensors `__metadata__` dict (the format is an 8-byte length, then a JSON header)."""
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_length])["__metadata__"]
