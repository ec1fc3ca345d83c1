"""Our adapter export <-> an AdapterHub (`adapters` 1.x) Houlsby adapter: the configs, keys and shapes, both ways.

Our adapters are AdapterHub's `DoubleSeqBnConfig` with the exact GELU and every other field at its default:
its BertSelfOutput / BertOutput run dense -> dropout -> LayerNorm(x + up(gelu(down(x))) + input), our placement.
Our pooler + classifier is its 2-layer tanh classification head on [CLS] (`use_pooler=False`). What AdapterHub's
adapter files cannot hold, base-model weights that trained here (the LayerNorms in Houlsby mode, a trained
pooler), travels in a side file in the base model's own key names. `to_hub` and `from_hub` map between our
parameters and AdapterHub's tensors; `write_folder` and `read_folder` are its files.
"""

import dataclasses
import io
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import traverse_util

from adapter_jax import adapters, tasks, weights
from adapter_jax.errors import CheckpointError
from adapter_jax.run_spec import RunSpec

ADAPTER_CONFIG_FILE = "adapter_config.json"
HEAD_CONFIG_FILE = "head_config.json"
# (adapter weights, head weights) as `save_adapter` names them: torch pickles, or safetensors files that
# `load_adapter(..., use_safetensors=True)` reads.
TORCH_FILES = ("pytorch_adapter.bin", "pytorch_model_head.bin")
SAFETENSORS_FILES = ("adapter.safetensors", "model_head.safetensors")
SIDE_FILE = "trained_base_weights.safetensors"
README_FILE = "README.md"
LIBRARY_VERSION = "adapters.1.3.0"
MODEL_CLASS = "BertAdapterModel"
# Our RunSpec and base fingerprint, an extra top-level key of adapter_config.json (AdapterHub keeps such keys
# as metadata and ignores them): a round trip gets the run back whole.
METADATA_KEY = "adapter_jax"

# DoubleSeqBnConfig(non_linearity="gelu") as adapters 1.3.0 writes it. The first four fields are what our
# adapters set; every other field must hold this value, except _INFERENCE_IRRELEVANT.
HOULSBY_CONFIG: Mapping[str, Any] = {
    "mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "leave_out": [],
    "non_linearity": "gelu", "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
    "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False, "init_weights": "bert",
    "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "dropout": 0.0, "stochastic_depth": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True,
}
_SET_BY_US = ("mh_adapter", "output_adapter", "reduction_factor", "leave_out")
# Fields that change training or initialisation only (dropouts are off at inference), or that only matter when
# a field already required to be off (phm_layer, inv_adapter) is on.
_INFERENCE_IRRELEVANT = frozenset(
    {"init_weights", "init_weights_seed", "dropout", "stochastic_depth", "inv_adapter_reduction_factor"}
    | {key for key in HOULSBY_CONFIG if key.startswith("phm_") and key != "phm_layer"}
    | {"factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "learn_phm",
       "hypercomplex_nonlinearity"}
)
# The head: dropout, Linear (our pooler), tanh, dropout, Linear (our classifier).
HEAD_CONFIG: Mapping[str, Any] = {
    "head_type": "classification", "layers": 2, "activation_function": "tanh", "use_pooler": False, "bias": True,
}
_HEAD_IRRELEVANT = frozenset({"dropout_prob", "num_labels", "label2id"})
_POOLER, _CLASSIFIER = "1", "4"
_ADAPTER_KEY = re.compile(
    r"bert\.encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\.adapter_(down\.0|up)\.(weight|bias)"
)

Flat = dict[tuple[str, ...], np.ndarray]


@dataclasses.dataclass(frozen=True)
class HubAdapter:
    """An AdapterHub adapter with its head, as its files hold it: configs as JSON-ready dicts, tensors in
    PyTorch layout under AdapterHub's key names; `side` holds base-model tensors in the model's own names."""

    adapter_config: dict
    head_config: dict
    adapter: dict[str, np.ndarray]
    head: dict[str, np.ndarray]
    side: dict[str, np.ndarray]


def _metadata_block(name: str, hidden_size: int, model: str, config: dict) -> dict:
    return {"config": config, "hidden_size": hidden_size, "model_class": MODEL_CLASS, "model_name": model,
            "model_type": "bert", "name": name, "version": LIBRARY_VERSION}


def hub_adapter_config(spec: RunSpec, hidden_size: int, num_layers: int) -> dict:
    """The DoubleSeqBnConfig of `spec`'s adapters; refuses (CheckpointError naming the setting) what AdapterHub
    cannot express."""
    if spec.mode != "adapters":
        raise CheckpointError(f"mode: a {spec.mode!r} run has no adapters for AdapterHub; use --format=hf")
    size = spec.adapter.size
    reduction_factor = hidden_size / size
    if int(hidden_size // reduction_factor) != size:
        raise CheckpointError(
            f"adapter.size: AdapterHub derives the bottleneck size as int(hidden_size // reduction_factor), "
            f"{int(hidden_size // reduction_factor)} for reduction_factor {hidden_size}/{size}, not {size}"
        )
    layers = range(num_layers) if spec.adapter.layers is None else spec.adapter.layers
    return {
        **HOULSBY_CONFIG,
        "mh_adapter": "attention" in spec.adapter.sites,
        "output_adapter": "output" in spec.adapter.sites,
        "reduction_factor": reduction_factor,
        "leave_out": [layer for layer in range(num_layers) if layer not in layers],
    }


def to_hub(
    exported_params: Mapping[str, Any], spec: RunSpec, base_pooler: Mapping[str, Any], *, name: str,
    hidden_size: int, num_layers: int, metadata: Mapping[str, Any],
) -> HubAdapter:
    """An export's trained parameters (`exported_params`, nested) as an AdapterHub adapter named `name`, its
    head and side file; `base_pooler` (BertModel's params['pooler']) is the head's first layer where the pooler
    did not train."""
    if not re.fullmatch(r"[^.\s]+", name):
        raise CheckpointError(f"name: {name!r} cannot name an AdapterHub adapter (no dots or spaces)")
    config = hub_adapter_config(spec, hidden_size, num_layers)
    tensors = weights.to_hf_tensors(traverse_util.flatten_dict(exported_params))
    pooler = weights.to_hf_tensors(traverse_util.flatten_dict({"bert": {"pooler": base_pooler}}))
    pooler.update({key: value for key, value in tensors.items() if key.startswith("bert.pooler.")})
    head = {f"heads.{name}.{_POOLER}.{key.split('.')[-1]}": value for key, value in pooler.items()}
    adapter, side = {}, {}
    for key, value in tensors.items():
        if key.startswith("classifier."):
            head[f"heads.{name}.{_CLASSIFIER}.{key.split('.')[-1]}"] = value
        elif ".adapter." in key:
            hub_key = key.replace(".adapter.down.", f".adapters.{name}.adapter_down.0.")
            adapter[hub_key.replace(".adapter.up.", f".adapters.{name}.adapter_up.")] = value
        else:  # a base-model weight that trained: the LayerNorms, the pooler
            side[key] = value
    labels = tasks.get_task(spec.task).labels
    head_config = {
        **HEAD_CONFIG, "dropout_prob": None, "num_labels": spec.num_labels,
        "label2id": None if labels is None else {label: i for i, label in enumerate(labels)},
    }
    return HubAdapter(
        adapter_config={**_metadata_block(name, hidden_size, spec.model, config), METADATA_KEY: dict(metadata)},
        head_config=_metadata_block(name, hidden_size, spec.model, head_config),
        adapter=adapter, head=head, side=side,
    )


def config_problems(config: Mapping[str, Any], known: Mapping[str, Any], irrelevant: frozenset[str],
                    file: str) -> list[str]:
    """`file`'s fields that differ from `known` where our model would compute something else."""
    problems = [f"{file}: config.{key}={value!r} is not computed here (expected {known[key]!r})"
                for key, value in config.items()
                if key in known and key not in irrelevant and key not in _SET_BY_US and value != known[key]]
    problems += [f"{file}: config.{key} is unknown to adapters 1.3's Houlsby adapters"
                 for key in config if key not in known and key not in irrelevant and key != "architecture"]
    if config.get("architecture", "bottleneck") != "bottleneck":
        problems.append(f"{file}: config.architecture={config['architecture']!r} is not a bottleneck adapter")
    return problems


def _adapter_spec(config: Mapping[str, Any], hidden_size: int, num_layers: int) -> tuple[int, tuple[str, ...],
                                                                                          tuple[int, ...] | None]:
    """(size, sites, layers) of an AdapterHub bottleneck config, its non-Houlsby fields refused."""
    problems = config_problems(config, HOULSBY_CONFIG, _INFERENCE_IRRELEVANT, ADAPTER_CONFIG_FILE)
    factor = config.get("reduction_factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= hidden_size:
        problems.append(f"{ADAPTER_CONFIG_FILE}: config.reduction_factor={factor!r} is not computed here "
                        f"(expected one number in (0, {hidden_size}] for every layer)")
    leave_out = config.get("leave_out") or []
    if not all(isinstance(layer, int) and 0 <= layer < num_layers for layer in leave_out):
        problems.append(f"{ADAPTER_CONFIG_FILE}: config.leave_out={leave_out!r} names layers the base model "
                        f"(layers 0-{num_layers - 1}) does not have")
    sites = tuple(site for site, key in zip(adapters.SITES, ("mh_adapter", "output_adapter"), strict=True)
                  if config.get(key, HOULSBY_CONFIG[key]))
    if not sites:
        problems.append(f"{ADAPTER_CONFIG_FILE}: config.mh_adapter and config.output_adapter are both off")
    if problems:
        raise CheckpointError("; ".join(problems))
    layers = tuple(layer for layer in range(num_layers) if layer not in leave_out)
    return int(hidden_size // factor), sites, None if len(layers) == num_layers else layers


def _head_problems(head_config: Mapping[str, Any], task: tasks.Task) -> list[str]:
    problems = config_problems(head_config.get("config") or {}, HEAD_CONFIG, _HEAD_IRRELEVANT, HEAD_CONFIG_FILE)
    config = head_config.get("config") or {}
    if config.get("num_labels") != task.num_labels:
        problems.append(f"{HEAD_CONFIG_FILE}: config.num_labels={config.get('num_labels')!r}, but {task.name} has "
                        f"{task.num_labels}")
    label2id = config.get("label2id") or {}
    names = [label for label, _ in sorted(label2id.items(), key=lambda item: item[1])]
    if task.labels is not None and names and names not in (list(task.labels), [f"LABEL_{i}" for i in
                                                                                 range(task.num_labels)]):
        problems.append(f"{HEAD_CONFIG_FILE}: config.label2id orders the labels {names}, not {list(task.labels)}")
    return problems


def from_hub(
    hub: HubAdapter, *, task: str, model: str, max_seq_length: int, init_std: float,
    base_params: Mapping[str, Any], hidden_size: int, num_layers: int,
) -> tuple[dict, RunSpec]:
    """(trained parameters, RunSpec) of our export for an AdapterHub Houlsby adapter with its head, on the base
    model whose BertModel params are `base_params`. Refuses (CheckpointError naming the file and field) what we
    would not compute exactly. The LayerNorms trained (`houlsby_layernorms`) when the side file holds them, the
    pooler when the head's first layer is not the base model's pooler."""
    task_info = tasks.get_task(task)
    problems = []
    if hub.adapter_config.get("hidden_size", hidden_size) != hidden_size:
        problems.append(f"{ADAPTER_CONFIG_FILE}: hidden_size={hub.adapter_config['hidden_size']}, but the base "
                        f"model {model!r} has {hidden_size}")
    size, sites, layers = _adapter_spec(hub.adapter_config.get("config") or {}, hidden_size, num_layers)
    problems += _head_problems(hub.head_config, task_info)
    if problems:
        raise CheckpointError("; ".join(problems))
    flat = _adapter_params(hub.adapter, hub.adapter_config.get("name"))
    flat.update(_head_params(hub.head, hub.head_config.get("name")))
    base_pooler = traverse_util.flatten_dict({"bert": {"pooler": base_params["pooler"]}})
    train_pooler = any(not np.array_equal(flat[path], value) for path, value in base_pooler.items())
    if not train_pooler:
        for path in base_pooler:
            del flat[path]
    flat.update(_side_params(hub.side, base_params))
    spec = RunSpec(
        task=task_info.name, model=model, mode="adapters",
        adapter=adapters.AdapterConfig(size=size, init_std=init_std, sites=sites, layers=layers),
        top_k=0, train_pooler=train_pooler, max_seq_length=max_seq_length,
        houlsby_layernorms=any("LayerNorm" in path for path in flat),
    )
    return traverse_util.unflatten_dict(flat), spec


def _adapter_params(tensors: Mapping[str, np.ndarray], name: Any) -> Flat:
    flat = {}
    for key, value in tensors.items():
        match = _ADAPTER_KEY.fullmatch(key)
        if match is None or match.group(3) != name:
            raise CheckpointError(f"adapter weights: tensor {key} is not a Houlsby adapter tensor of adapter {name!r}")
        layer, site, _, projection, leaf = match.groups()
        path = ("bert", "encoder", f"layer_{layer}", *site.split("."), "adapter",
                "down" if projection == "down.0" else "up", "kernel" if leaf == "weight" else "bias")
        flat[path] = np.ascontiguousarray(value.T if leaf == "weight" else value, dtype=np.float32)
    return flat


def _head_params(tensors: Mapping[str, np.ndarray], name: Any) -> Flat:
    """The head's Linear layers as our pooler (bert/pooler/dense) and classifier."""
    owners = {_POOLER: ("bert", "pooler", "dense"), _CLASSIFIER: ("classifier",)}
    flat = {}
    for key, value in tensors.items():
        prefix, _, rest = key.rpartition(".")
        layer = prefix.removeprefix(f"heads.{name}.")
        if layer not in owners or rest not in ("weight", "bias"):
            raise CheckpointError(f"head weights: tensor {key} is not a layer of head {name!r}'s 2-layer classifier")
        flat[(*owners[layer], "kernel" if rest == "weight" else "bias")] = np.ascontiguousarray(
            value.T if rest == "weight" else value, dtype=np.float32)
    missing = [f"heads.{name}.{layer}.{leaf}" for layer in owners for leaf in ("weight", "bias")
               if (*owners[layer], "kernel" if leaf == "weight" else "bias") not in flat]
    if missing:
        raise CheckpointError(f"head weights: missing tensors {missing}")
    return flat


def _side_params(tensors: Mapping[str, np.ndarray], base_params: Mapping[str, Any]) -> Flat:
    """The side file's LayerNorms, as paths of the full model ('bert', ...); every LayerNorm if any, since
    they train together. A pooler there is the head's first layer again, and left to the head."""
    base = traverse_util.flatten_dict(base_params)
    layer_norms = {path: value for path, value in base.items() if "LayerNorm" in path}
    given = {key: value for key, value in tensors.items() if not key.startswith("bert.pooler.")}
    if not given:
        return {}
    params = weights.from_hf_tensors(given, layer_norms, SIDE_FILE)
    return {("bert", *path): value for path, value in traverse_util.flatten_dict(params).items()}


def write_folder(hub: HubAdapter, out_dir: pathlib.Path, *, use_torch: bool) -> list[pathlib.Path]:
    """Writes `hub` as `save_adapter` would (torch pickles with `use_torch`, else safetensors files), the side
    file beside them when it holds anything; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier conversion's weights of the other kind, or its side file, would be loaded instead of (or beside)
    # what is written now: `read_folder` and AdapterHub itself take .bin before .safetensors.
    for name in (*(SAFETENSORS_FILES if use_torch else TORCH_FILES), *(() if hub.side else (SIDE_FILE,))):
        (out_dir / name).unlink(missing_ok=True)
    files = [out_dir / ADAPTER_CONFIG_FILE, out_dir / HEAD_CONFIG_FILE]
    for path, config in zip(files, (hub.adapter_config, hub.head_config), strict=True):
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name, tensors in zip(TORCH_FILES if use_torch else SAFETENSORS_FILES, (hub.adapter, hub.head), strict=True):
        files.append(out_dir / name)
        if use_torch:
            import torch

            torch.save({key: torch.from_numpy(value) for key, value in tensors.items()}, files[-1])
        else:
            safetensors.numpy.save_file(dict(tensors), files[-1], metadata={"format": "pt"})
    if hub.side:
        files.append(out_dir / SIDE_FILE)
        safetensors.numpy.save_file(dict(hub.side), files[-1], metadata={"format": "pt"})
    return files


def read_folder(folder: epath.PathLike) -> HubAdapter:
    """An AdapterHub adapter folder (`save_adapter`'s files, either kind; local or gs://) with its head and our
    side file if there; CheckpointError names a file that is missing or unreadable."""
    folder = epath.Path(folder)
    configs = []
    for name in (ADAPTER_CONFIG_FILE, HEAD_CONFIG_FILE):
        try:
            configs.append(json.loads((folder / name).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {folder / name}: {e}") from e
        if not isinstance(configs[-1], dict):
            raise CheckpointError(f"{folder / name} is not a JSON object")
    kind = TORCH_FILES if (folder / TORCH_FILES[0]).is_file() else SAFETENSORS_FILES
    adapter, head = (_read_tensors(folder / name) for name in kind)
    side = _read_tensors(folder / SIDE_FILE) if (folder / SIDE_FILE).is_file() else {}
    return HubAdapter(configs[0], configs[1], adapter, head, side)


def _read_tensors(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".safetensors":
            return safetensors.numpy.load(path.read_bytes())
        import torch

        # weights_only: unpickling a downloaded adapter must not run code.
        pickled = io.BytesIO(path.read_bytes())
        return {key: value.float().numpy() for key, value in torch.load(pickled, weights_only=True).items()}
    except ImportError as e:
        raise CheckpointError(f"{path} is a PyTorch file and torch is not installed") from e
    except Exception as e:  # torch and safetensors raise many types for a damaged or missing file
        raise CheckpointError(f"cannot read {path}: {e}") from e
