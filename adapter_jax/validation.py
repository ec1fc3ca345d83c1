"""Checks a config before anything is loaded or compiled, and reports every problem at once."""

import json
import math
import shlex
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import ml_collections
from etils import epath

from adapter_jax import adapters, checkpoint, tasks, trainable, weights
from adapter_jax.checks import non_negative_int, number, positive_int
from adapter_jax.errors import AdapterJaxError, CheckpointError, ConfigError, DataError
from adapter_jax.workdir import Workdir, read_json, sibling_of_this_process

DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("tsv", "tfds")
ON_NONFINITE = ("stop", "skip")
# What a config is checked for: training, prediction (GLUE test files), or evaluation on dev alone (ablations).
PURPOSES = ("train", "predict", "evaluate")
# AX has test data only and is predicted with an MNLI model.
TRAINABLE_TASKS = tuple(sorted(tasks.GLUE_TASKS))
# Keys that may change when a run resumes; every other key defines the run and must match.
RESUMABLE_KEYS = frozenset(
    {"log_every_steps", "checkpoint_every_steps", "checkpoints_to_keep", "eval_batch_size", "glue_dir",
     "tfds_data_dir", "data_source", "lock_lease_seconds", "compilation_cache_dir", "storage_deadline_minutes"}
)
# Keys added after runs were saved without them, with the value such a run was trained with.
KEYS_ADDED_LATER = {"packing": False, "houlsby_layernorms": True}


def _one_of(options: tuple) -> Callable[[Any], bool]:
    return lambda value: value in options


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(non_negative_int(v) for v in value)


# Every key the trainer reads, with its check and what is allowed. A key not listed is unknown.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (_one_of(TRAINABLE_TASKS), f"one of {list(TRAINABLE_TASKS)} (ax is predicted by an mnli run)"),
    "model": (lambda v: isinstance(v, str) and bool(v), "a model folder or hub name"),
    "dtype": (_one_of(DTYPES), f"one of {DTYPES}"),
    "dropout_rate": (
        number(-math.inf, 1.0, high_inclusive=False),
        "a probability in [0, 1), or < 0 for the checkpoint's own",
    ),
    "mode": (_one_of(trainable.MODES), f"one of {trainable.MODES}"),
    "adapter_size": (positive_int, "a positive integer no larger than the hidden size"),
    "adapter_init_std": (number(0.0, low_inclusive=False), "a positive number"),
    "adapter_sites": (
        lambda v: isinstance(v, (tuple, list)) and bool(v) and set(v) <= set(adapters.SITES),
        f"a non-empty subset of {adapters.SITES}",
    ),
    "adapter_layers": (_int_tuple, "layer indices (empty: every layer)"),
    "top_k": (non_negative_int, "a non-negative integer (layers to fine-tune in top_k mode)"),
    "train_pooler": (lambda v: isinstance(v, bool), "true or false"),
    "houlsby_layernorms": (lambda v: isinstance(v, bool), "true or false"),
    "data_source": (_one_of(DATA_SOURCES), f"one of {DATA_SOURCES}"),
    "glue_dir": (lambda v: isinstance(v, str), "a folder in the original GLUE layout"),
    "tfds_data_dir": (lambda v: isinstance(v, str), "a TFDS data folder, or empty for TFDS's default"),
    "max_seq_length": (positive_int, "a positive integer no larger than the model's max positions"),
    "packing": (lambda v: isinstance(v, bool), "true or false (false: bucketing)"),
    "buckets": (
        lambda v: isinstance(v, (tuple, list)) and bool(v) and all(positive_int(b) for b in v),
        "non-empty positive sequence lengths",
    ),
    "max_train_examples": (non_negative_int, "a non-negative integer (0: all)"),
    "learning_rate": (number(0.0, low_inclusive=False), "a positive number"),
    "num_epochs": (positive_int, "a positive integer"),
    "num_train_steps": (non_negative_int, "a non-negative integer (0: use num_epochs)"),
    "global_batch_size": (positive_int, "a positive multiple of the device count"),
    "eval_batch_size": (positive_int, "a positive multiple of the device count"),
    "warmup_fraction": (number(0.0, 1.0), "a fraction in [0, 1]"),
    "weight_decay": (number(0.0), "a non-negative number"),
    "adam_epsilon": (number(0.0, low_inclusive=False), "a positive number"),
    "max_grad_norm": (number(0.0, low_inclusive=False), "a positive number"),
    "seed": (non_negative_int, "a non-negative integer"),
    "on_nonfinite": (_one_of(ON_NONFINITE), f"one of {ON_NONFINITE}"),
    "log_every_steps": (positive_int, "a positive integer"),
    "checkpoint_every_steps": (positive_int, "a positive integer"),
    "checkpoints_to_keep": (positive_int, "a positive integer"),
    "lock_lease_seconds": (positive_int, "a positive number of seconds"),
    "compilation_cache_dir": (lambda v: isinstance(v, str), "a folder, or empty for no compilation cache"),
    "storage_deadline_minutes": (number(0.0, low_inclusive=False), "a positive number of minutes"),
}

# A problem found: the key at fault, and what is wrong with it.
Problem = tuple[str, str]


def validate_config(
    config: ml_collections.ConfigDict, workdir: epath.PathLike | None = None, *, purpose: str = "train",
    unread: Collection[str] = (),
) -> weights.ModelFolder:
    """Raises ConfigError listing every problem, each with the key at fault and what is allowed.

    `purpose` (one of PURPOSES) says which data files must exist: training needs train and dev, prediction
    dev and test (and, for MNLI, AX's test file), evaluation dev alone. Problems of the `unread` keys are left
    out: an export's run decides them, not the config (run_spec.MODEL_KEYS). Returns the opened model folder,
    so that the run need not find it again.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    problems = list(_key_problems(config))
    # Checks across keys run on the keys that are valid on their own, so that one bad key does not
    # hide the problems of the others.
    bad_keys = {key for key, _ in problems}
    model_folder = None
    if "model" not in bad_keys:
        try:
            model_folder = weights.open_model_folder(config.model)
        except AdapterJaxError as e:
            problems.append(("model", str(e)))
    problems += _consistency_problems(config, bad_keys, purpose, model_folder)
    if workdir is not None:
        problems += _workdir_problems(config, epath.Path(workdir))
    problems = [(key, message) for key, message in problems if key not in unread]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {key}: {message}" for key, message in problems))
    return model_folder


def _key_problems(config: ml_collections.ConfigDict) -> Iterator[Problem]:
    for key in sorted(set(config.keys()) - set(CHECKS)):
        yield key, f"unknown key (known keys: {', '.join(sorted(CHECKS))})"
    for key, (check, allowed) in CHECKS.items():
        if key not in config:
            yield key, f"missing (must be {allowed})"
        elif not check(config[key]):
            yield key, f"{config[key]!r} is not allowed (must be {allowed})"


def _consistency_problems(
    config: ml_collections.ConfigDict, bad_keys: set[str], purpose: str, model_folder: weights.ModelFolder | None
) -> list[Problem]:
    """Checks across keys and against the model, the devices and the data, of keys valid on their own."""
    problems = []

    def valid(*keys: str) -> bool:
        return not bad_keys.intersection(keys)

    devices = jax.device_count()
    for key in ("global_batch_size", "eval_batch_size"):
        if valid(key) and config[key] % devices:
            problems.append((key, f"{config[key]} is not divisible by the {devices} devices"))
    if model_folder is not None:
        bert_config = model_folder.config
        has_adapters = valid("mode", "adapter_size") and config.mode == "adapters"
        if has_adapters and config.adapter_size > bert_config.hidden_size:
            problems.append(
                ("adapter_size", f"{config.adapter_size} is larger than the hidden size {bert_config.hidden_size}")
            )
        if valid("max_seq_length") and config.max_seq_length > bert_config.max_position_embeddings:
            positions = bert_config.max_position_embeddings
            message = f"{config.max_seq_length} is above the model's max_position_embeddings {positions}"
            problems.append(("max_seq_length", message))
        layers = bert_config.num_hidden_layers
        if valid("mode", "top_k") and config.mode == "top_k" and not 1 <= config.top_k <= layers:
            problems.append(("top_k", f"{config.top_k} must be in 1..{layers} in top_k mode"))
        bad_layers = [layer for layer in config.adapter_layers if layer >= layers] if valid("adapter_layers") else []
        if bad_layers:
            problems.append(("adapter_layers", f"{bad_layers} beyond the model's {layers} layers (0..{layers - 1})"))
    if valid("max_seq_length", "task"):
        problems += _sequence_length_problems(config)
    if valid("data_source", "task", "glue_dir") and config.data_source == "tsv":
        task = tasks.get_task(config.task)
        needed = [(task, split) for split in (("train",) if purpose == "train" else ()) + task.dev_splits]
        if purpose == "predict":
            needed += [(predicted, split) for predicted in tasks.prediction_tasks(task) for split in predicted.test_splits]
        for needed_task, split in needed:
            path = epath.Path(config.glue_dir) / needed_task.dir_name / needed_task.splits[split]
            if not path.exists():
                fetch = shlex.join(["python", "-m", "scripts.download_glue", f"--tasks={needed_task.name}",
                                    f"--out={config.glue_dir}"])
                message = f"{path} not found (task {needed_task.name}, split {split}); to download it, run {fetch}"
                problems.append(("glue_dir", message))
    return problems


def _sequence_length_problems(config: ml_collections.ConfigDict) -> list[Problem]:
    """An example is [CLS] text [SEP] (a pair: [CLS] a [SEP] b [SEP]): each text needs one token and one [SEP]."""
    columns = len(tasks.get_task(config.task).text_columns)
    shortest = 1 + 2 * columns
    if config.max_seq_length >= shortest:
        return []
    layout = "[CLS] a [SEP] b [SEP]" if columns == 2 else "[CLS] text [SEP]"
    message = f"{config.max_seq_length} is too short for {config.task}'s {layout}: at least {shortest}"
    return [("max_seq_length", message)]


def _workdir_problems(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[Problem]:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = sibling_of_this_process(workdir / "write-test", "probe")  # every host checks its access
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return [("workdir", f"{workdir} cannot be written ({e.strerror or e})")]
    try:
        found = saved_config(workdir)
    except (CheckpointError, DataError) as e:
        return [("workdir", f"{e}; use a new workdir, or delete that file to resume from the checkpoint before")]
    if found is None:
        return []
    holder, saved = found
    saved = {**KEYS_ADDED_LATER, **saved}
    differences = [
        f"{key}: {holder} has {saved.get(key)!r}, config has {_plain(config.get(key))!r}"
        for key in sorted(set(saved) | set(config.keys()))
        if key not in RESUMABLE_KEYS and saved.get(key) != _plain(config.get(key))
    ]
    if not differences:
        return []
    message = (
        f"{workdir} holds a run with another config; use a new workdir or the same config. "
        f"Differences: {'; '.join(differences)}"
    )
    return [("workdir", message)]


def saved_config(workdir: epath.Path) -> tuple[str, dict] | None:
    """("checkpoint", its config) of the newest checkpoint in `workdir`, else ("history", the config its
    metrics history began with), or None for a new workdir."""
    files = Workdir(workdir)
    if files.checkpoints.exists():
        meta = checkpoint.latest_meta(checkpoint.checkpoint_manager(workdir))
        if meta is not None:
            return "checkpoint", meta["config"]
    if files.history_config.exists():
        return "history", read_json(files.history_config)
    return None


def _plain(value: Any) -> Any:
    """A config value as it reads back from the checkpoint's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
