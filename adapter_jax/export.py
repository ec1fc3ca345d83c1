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
from adapter_jax import run_spec, validation, weights
from adapter_jax.errors import CheckpointError
from adapter_jax.modeling import BertConfig
from adapter_jax.run_spec import RunSpec
from adapter_jax.workdir import EXPORT_FILE, Workdir, write_atomic, writing

_METADATA_KEY = "adapter_jax"
_SEPARATOR = "/"
# Format 1 (every export so far): the RunSpec's keys at the top level, beside the base model's fingerprint and
# BERT config. A reader needs the spec and the fingerprint.
_FORMAT = 1
_REQUIRED_SETTINGS = (*run_spec.KEYS, "base_fingerprint")


@dataclasses.dataclass(frozen=True)
class Export:
    """An export read back: the trained parameters, the run they belong to, and the base model they fit."""

    params: dict  # the trainable subtree, nested
    spec: RunSpec
    base_fingerprint: str  # of the base model's weights (weights.fingerprint)
    source: epath.Path  # the file, for messages


def metadata(experiment: experiment_lib.Experiment) -> dict[str, Any]:
    """What an export must say so that it can be checked against a base model and rebuilt."""
    return metadata_of(experiment.spec, experiment.base_fingerprint, dataclasses.asdict(experiment.bert_config))


def metadata_of(spec: RunSpec, base_fingerprint: str, bert_config: Mapping[str, Any]) -> dict[str, Any]:
    """`metadata` of a run not built here (e.g. imported from AdapterHub); `bert_config` as a dict."""
    return {"format": _FORMAT, **spec.to_dict(), "base_fingerprint": base_fingerprint, "bert_config": dict(bert_config)}


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


def read_raw(path: epath.PathLike) -> tuple[dict, dict]:
    """The nested parameters and metadata of the export at `path` (see `export_file`), its keys checked."""
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
        missing += [f"adapter.{key}" for key in run_spec.ADAPTER_KEYS if key not in adapter]
    if missing:
        raise CheckpointError(
            f"adapter export {path} lacks the settings {missing} in its {_METADATA_KEY!r} metadata; "
            f"it was written by another version of adapter-jax or edited"
        )
    wrong = run_spec.settings_problems(settings)
    if not isinstance(settings["base_fingerprint"], str):
        wrong.append(f"base_fingerprint: {settings['base_fingerprint']!r} is not allowed (must be a string)")
    if wrong:
        raise CheckpointError(f"adapter export {path} has settings of the wrong type in its {_METADATA_KEY!r} "
                              f"metadata: {'; '.join(wrong)}")
    params = traverse_util.unflatten_dict({tuple(k.split(_SEPARATOR)): v for k, v in tensors.items()})
    return params, settings


def read(path: epath.PathLike) -> Export:
    """Reads an export written by `write`; `path` may be the file, the folder holding it or the training workdir."""
    params, settings = read_raw(path)
    return Export(params, RunSpec.from_dict(settings), settings["base_fingerprint"], export_file(path))


def check_fits(exported: Export, *, model: str, base_fingerprint: str, bert_config: BertConfig) -> None:
    """Refuses (CheckpointError naming the export) an export trained on a base model other than `model`,
    whose weights have `base_fingerprint` and config `bert_config`, or whose shapes differ from its run's."""
    if exported.base_fingerprint != base_fingerprint:
        raise CheckpointError(
            f"adapter export {exported.source} was trained on base model {exported.spec.model!r} "
            f"(weights sha256 {exported.base_fingerprint[:12]}...), but {model!r} has weights "
            f"sha256 {base_fingerprint[:12]}...; load it onto the base it was trained on"
        )
    expected = experiment_lib.trainable_shapes(exported.spec, bert_config)
    found = jax.tree.map(np.shape, exported.params)
    if expected != found:
        raise CheckpointError(
            f"adapter export {exported.source} does not match the model built from its settings: "
            f"expected parameter shapes {expected}, found {found}"
        )


def load(
    config: ml_collections.ConfigDict, path: epath.PathLike, purpose: str = "predict"
) -> tuple[experiment_lib.Experiment, ml_collections.ConfigDict]:
    """The base model of config.model with the export at `path` on it, and the config that reads the
    export's data (see `data_config`). The model is the export's run: its adapters, what trained and its head
    come from the export, not from the config."""
    exported = read(path)
    config, model_folder = data_config(exported, config, purpose)
    return onto_base(exported, config, model_folder), config


def data_config(
    exported: Export, config: ml_collections.ConfigDict, purpose: str
) -> tuple[ml_collections.ConfigDict, weights.ModelFolder]:
    """`config` reading the export's data (its task and sequence length; RunSpec.data_config), checked for
    `purpose` (a validation.PURPOSES: "predict" needs the test files, "evaluate" dev alone) but for the keys
    the export decides; and the opened model folder."""
    config = exported.spec.data_config(config)
    return config, validation.validate_config(config, purpose=purpose, unread=run_spec.MODEL_KEYS)


def onto_base(
    exported: Export, config: ml_collections.ConfigDict, model_folder: weights.ModelFolder | None = None
) -> experiment_lib.Experiment:
    """The export's run built on config.model, with its trained parameters; refuses a base model other than
    the one they were trained on, or mismatched shapes."""
    experiment = experiment_lib.build(config, model_folder, spec=exported.spec)
    check_fits(exported, model=config.model, base_fingerprint=experiment.base_fingerprint,
               bert_config=experiment.bert_config)
    return dataclasses.replace(experiment, trainable_params=exported.params)
