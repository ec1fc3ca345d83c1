"""The adapter export: what a task adds to the base model, in one file, and loading it back onto that base.

The export is <workdir>/export/adapters.safetensors: the trained parameters (adapters, LayerNorms,
head: the trainable subtree) plus, in the file's header, the settings and base-model fingerprint
they belong to. safetensors holds tensors only, so loading an export never unpickles anything.
"""

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import traverse_util

from adapter_jax import experiment as experiment_lib
from adapter_jax import weights
from adapter_jax.errors import CheckpointError
from adapter_jax.workdir import EXPORT_FILE, Workdir, write_atomic, writing

_METADATA_KEY = "adapter_jax"
_SEPARATOR = "/"
# The settings an export must carry to be rebuilt (config_for_export, onto_base).
_REQUIRED_SETTINGS = ("task", "model", "base_fingerprint", "adapter", "mode", "top_k", "train_pooler", "max_seq_length")
_REQUIRED_ADAPTER_SETTINGS = ("size", "init_std", "sites", "layers")


def metadata(config: ml_collections.ConfigDict, experiment: experiment_lib.Experiment) -> dict[str, Any]:
    """What an export must say so that it can be checked against a base model and rebuilt."""
    return {
        "format": 1,
        "task": experiment.task.name,
        "model": config.model,
        "base_fingerprint": experiment.base_fingerprint,
        "bert_config": dataclasses.asdict(experiment.bert_config),
        "adapter": dataclasses.asdict(experiment_lib.adapter_config(config)),
        "mode": config.mode,
        "top_k": config.top_k,
        "train_pooler": config.train_pooler,
        "num_labels": experiment.task.num_labels,
        "max_seq_length": config.max_seq_length,
    }


def write(directory: epath.PathLike, params: Mapping[str, Any], metadata: Mapping[str, Any]) -> epath.Path:
    """Writes the trained parameters and their settings to `<directory>/adapters.safetensors`, atomically."""
    directory = epath.Path(directory)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        _SEPARATOR.join(path): np.asarray(jax.device_get(leaf))
        for path, leaf in traverse_util.flatten_dict(params).items()
    }
    data = safetensors.numpy.save(tensors, metadata={_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return write_atomic(directory / EXPORT_FILE, data)


def export_file(path: epath.PathLike) -> epath.Path:
    """The export file meant by `path`: the file itself, the folder holding it, or the training workdir."""
    path = epath.Path(path)
    if not path.is_dir():
        return path
    in_workdir = Workdir(path).export_file
    return in_workdir if in_workdir.exists() else path / EXPORT_FILE


def read(path: epath.PathLike) -> tuple[dict, dict]:
    """Reads an export written by `write` (see `export_file` for what `path` may be): (nested params, metadata)."""
    path = export_file(path)
    if not path.exists():
        raise CheckpointError(f"adapter export not found: {path}")
    try:
        data = path.read_bytes()
        tensors = safetensors.numpy.load(data)
        header_length = int.from_bytes(data[:8], "little")  # safetensors: 8-byte length, then a JSON header
        settings = json.loads(json.loads(data[8 : 8 + header_length])["__metadata__"][_METADATA_KEY])
    except (KeyError, ValueError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"adapter export {path} is corrupt or not an adapter-jax export: {e}") from e
    if not isinstance(settings, dict):
        settings = {}
    missing = [key for key in _REQUIRED_SETTINGS if key not in settings]
    if "adapter" in settings:
        adapter = settings["adapter"] if isinstance(settings["adapter"], dict) else {}
        missing += [f"adapter.{key}" for key in _REQUIRED_ADAPTER_SETTINGS if key not in adapter]
    if missing:
        raise CheckpointError(
            f"adapter export {path} lacks the settings {missing} in its {_METADATA_KEY!r} metadata; "
            f"it was written by another version of adapter-jax or edited"
        )
    params = traverse_util.unflatten_dict({tuple(k.split(_SEPARATOR)): v for k, v in tensors.items()})
    return params, settings


def config_for_export(config: ml_collections.ConfigDict, settings: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config` with the export's own settings (task, what trained, adapters, sequence length) in place."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.task = settings["task"]
        config.mode = settings["mode"]
        config.top_k = settings["top_k"]
        config.train_pooler = settings["train_pooler"]
        config.adapter_size = settings["adapter"]["size"] or config.adapter_size
        config.adapter_init_std = settings["adapter"]["init_std"]
        config.adapter_sites = tuple(settings["adapter"]["sites"])
        config.adapter_layers = tuple(settings["adapter"]["layers"] or ())
        config.max_seq_length = settings["max_seq_length"]
    return config


def check_fits(
    trained: Mapping[str, Any],
    settings: Mapping[str, Any],
    source: epath.PathLike,
    *,
    model: str,
    base_fingerprint: str,
    expected_shapes: Mapping[str, Any],
) -> None:
    """Refuses (CheckpointError naming `source`) trained parameters from a base model other than `model`,
    whose weights have `base_fingerprint`, or whose shapes differ from `expected_shapes` (a tree of tuples)."""
    if settings["base_fingerprint"] != base_fingerprint:
        raise CheckpointError(
            f"adapter export {source} was trained on base model {settings['model']!r} "
            f"(weights sha256 {settings['base_fingerprint'][:12]}...), but {model!r} has weights "
            f"sha256 {base_fingerprint[:12]}...; load it onto the base it was trained on"
        )
    found = jax.tree.map(np.shape, dict(trained))
    if dict(expected_shapes) != found:
        raise CheckpointError(
            f"adapter export {source} does not match the model built from its settings: "
            f"expected parameter shapes {expected_shapes}, found {found}"
        )


def onto_base(
    config: ml_collections.ConfigDict,
    trained: Mapping[str, Any],
    settings: Mapping[str, Any],
    source: epath.PathLike,
    model_folder: weights.ModelFolder | None = None,
) -> experiment_lib.Experiment:
    """Builds `config` (which carries the export's settings) with the trained parameters read from
    `source`; refuses a base model other than the one they were trained on, or mismatched shapes."""
    experiment = experiment_lib.build(config, model_folder)
    check_fits(
        trained, settings, source, model=config.model, base_fingerprint=experiment.base_fingerprint,
        expected_shapes=jax.tree.map(np.shape, experiment.trainable_params),
    )
    return dataclasses.replace(experiment, trainable_params=dict(trained))
