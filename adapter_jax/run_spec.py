"""What a run is, apart from how it trains: the task, the base model, what trains and the adapters' shape.

A RunSpec is made once from the config (`from_config`), where "adapters of the config's size in adapters mode,
none otherwise" is decided; the model, the trainable mask, the export and the adapter bank all read that one
decision. The export stores it (`to_dict`) and a loader reads it back whole (`from_dict`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from adapter_jax import tasks, trainable
from adapter_jax.adapters import AdapterConfig
from adapter_jax.checks import non_negative_int, number, positive_int

# The keys `to_dict` writes and `from_dict` needs; the export's metadata format 1 holds them at its top level.
KEYS = ("task", "model", "mode", "adapter", "top_k", "train_pooler", "max_seq_length")
ADAPTER_KEYS = tuple(field.name for field in dataclasses.fields(AdapterConfig))
# The config keys that shape the model and what trains: a run loaded from its export takes them from its
# RunSpec, and never reads them from the config.
MODEL_KEYS = ("mode", "adapter_size", "adapter_init_std", "adapter_sites", "adapter_layers", "top_k", "train_pooler",
              "houlsby_layernorms")

_TEXT = (lambda v: isinstance(v, str) and bool(v), "a non-empty string")
# What `from_dict` may be given: each key's check and what it allows (the adapter's keys under "adapter.").
SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": _TEXT,
    "model": _TEXT,
    "mode": (lambda v: v in trainable.MODES, f"one of {list(trainable.MODES)}"),
    "top_k": (non_negative_int, "a non-negative integer"),
    "train_pooler": (lambda v: isinstance(v, bool), "true or false"),
    "max_seq_length": (positive_int, "a positive integer"),
    "adapter.size": (non_negative_int, "a non-negative integer"),
    "adapter.init_std": (number(0.0), "a non-negative number"),
    "adapter.sites": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of names"),
    "adapter.layers": (lambda v: v is None or (isinstance(v, list) and all(map(non_negative_int, v))),
                       "null or a list of layer indices"),
}


def settings_problems(settings: Mapping[str, Any]) -> list[str]:
    """`key: value is not allowed (must be ...)` for each setting of `settings` (a `to_dict`, read back) that
    `from_dict` could not use; the missing ones are left to the caller."""
    adapter = settings.get("adapter")
    flat = {**settings, **{f"adapter.{k}": v for k, v in adapter.items()}} if isinstance(adapter, dict) else settings
    return [f"{key}: {flat[key]!r} is not allowed (must be {allowed})"
            for key, (check, allowed) in SETTING_CHECKS.items() if key in flat and not check(flat[key])]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run's identity: what an export must carry to be rebuilt on its base model.

    task:           the GLUE task's name (tasks.TASKS).
    model:          the base model the config named (folder or hub name), as it was named when training.
    mode:           which parameters trained (trainable.MODES).
    adapter:        the adapters the model has: size 0 (none) unless mode is "adapters".
    top_k:          the top layers that trained in top_k mode.
    train_pooler:   whether the pooler trained too.
    max_seq_length: the length examples are tokenized to.
    houlsby_layernorms: in adapters mode, whether the base model's LayerNorms train too (the paper) or stay frozen
                    (an export that AdapterHub loads whole, with no side file).
    """

    task: str
    model: str
    mode: str
    adapter: AdapterConfig
    top_k: int
    train_pooler: bool
    max_seq_length: int
    houlsby_layernorms: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "RunSpec":
        """The run a (validated) config describes."""
        return cls(
            task=tasks.get_task(config.task).name,
            model=config.model,
            mode=config.mode,
            adapter=AdapterConfig(
                size=config.adapter_size if config.mode == "adapters" else 0,
                init_std=config.adapter_init_std,
                sites=tuple(config.adapter_sites),
                layers=tuple(config.adapter_layers) or None,
            ),
            top_k=config.top_k,
            train_pooler=config.train_pooler,
            max_seq_length=config.max_seq_length,
            houlsby_layernorms=config.houlsby_layernorms,
        )

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> "RunSpec":
        """The inverse of `to_dict`; other keys of `settings` are ignored."""
        adapter = settings["adapter"]
        return cls(
            task=settings["task"],
            model=settings["model"],
            mode=settings["mode"],
            adapter=AdapterConfig(
                size=adapter["size"],
                init_std=adapter["init_std"],
                sites=tuple(adapter["sites"]),
                layers=None if adapter["layers"] is None else tuple(adapter["layers"]),
            ),
            top_k=settings["top_k"],
            train_pooler=settings["train_pooler"],
            max_seq_length=settings["max_seq_length"],
            # Exports written before the key existed trained their LayerNorms.
            houlsby_layernorms=settings.get("houlsby_layernorms", True),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; num_labels is written for readers of the file, and derived from the task on reading.
        houlsby_layernorms is written only when False, so that the default run's export is format 1 as before."""
        settings = {**dataclasses.asdict(self), "num_labels": self.num_labels}
        if self.houlsby_layernorms:
            del settings["houlsby_layernorms"]
        return settings

    @property
    def num_labels(self) -> int:
        return tasks.get_task(self.task).num_labels

    def trainable_mask(self, params: Any, num_layers: int) -> dict:
        """True for each parameter (or jax.ShapeDtypeStruct) of `params` that trains in this run."""
        return trainable.trainable_mask(
            params, mode=self.mode, num_layers=num_layers, top_k=self.top_k, train_pooler=self.train_pooler,
            houlsby_layernorms=self.houlsby_layernorms,
        )

    def data_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """`config` reading this run's data: its task, tokenized to its length (the rest, e.g. the data folder
        and the evaluation batch, stays the config's)."""
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.task = self.task
            config.max_seq_length = self.max_seq_length
        return config
