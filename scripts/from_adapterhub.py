r"""An AdapterHub Houlsby adapter with its head (adapters 1.x, `save_adapter`'s folder) as an adapter-jax export:

    python -m scripts.from_adapterhub --adapter=/tmp/rte-adapterhub --out=/tmp/rte-imported/export [--task=rte]

writes <out>/adapters.safetensors, which `--action=predict` (out = <workdir>/export), the adapter bank and serve
load like an export of our own. The adapter must be one this model computes exactly: `DoubleSeqBnConfig` with
non_linearity="gelu" and the other fields at their defaults (Pfeiffer placement, another non-linearity, scaling,
gating, phm, ... are refused, naming the field), and the head a 2-layer tanh classification head on [CLS]. The side
file trained_base_weights.safetensors, where present (scripts/to_adapterhub.py writes it), brings the trained
LayerNorms. Task, base model and sequence length come from adapter-jax's own metadata in adapter_config.json when it
is there (an adapter exported from here), else from the flags, the adapter's name and its model_name. Either
folder may be in a bucket (gs://).
"""

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from adapter_jax import adapterhub, cli, export, tasks, weights
from adapter_jax.errors import CheckpointError
from adapter_jax.export import Export

DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_INIT_STD = 1e-3  # configs/glue.py's; only initialisation reads it


def _task(given: str | None, metadata: Mapping[str, Any], adapter_config: Mapping[str, Any]) -> str:
    name = given or metadata.get("task") or adapter_config.get("name")
    if name not in tasks.GLUE_TASKS:
        raise CheckpointError(f"{adapterhub.ADAPTER_CONFIG_FILE}: the adapter's name {name!r} is not a GLUE task; "
                              f"pass --task")
    return name


def convert(folder: epath.PathLike, out_dir: epath.PathLike, *, task: str | None = None, model: str | None = None,
            max_seq_length: int | None = None) -> epath.Path:
    """Writes the AdapterHub adapter in `folder` as `<out_dir>/adapters.safetensors`; returns that file."""
    folder = epath.Path(folder)
    hub = adapterhub.read_folder(folder)
    metadata = hub.adapter_config.get(adapterhub.METADATA_KEY) or {}
    model = model or metadata.get("model") or hub.adapter_config.get("model_name")
    if not model:
        raise CheckpointError(f"{folder / adapterhub.ADAPTER_CONFIG_FILE} names no model_name; pass --model")
    model_folder = weights.open_model_folder(model)
    bert_config, base = weights.load_pretrained(model_folder)
    params, spec = adapterhub.from_hub(
        hub, task=_task(task, metadata, hub.adapter_config), model=model,
        max_seq_length=max_seq_length or metadata.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH,
        init_std=(metadata.get("adapter") or {}).get("init_std", DEFAULT_INIT_STD),
        base_params=base, hidden_size=bert_config.hidden_size, num_layers=bert_config.num_hidden_layers,
    )
    fingerprint = weights.fingerprint(base)
    export.check_fits(Export(params, spec, fingerprint, folder), model=model,
                      base_fingerprint=fingerprint, bert_config=bert_config)
    bert = metadata.get("bert_config") or bert_config.to_dict()
    return export.write(out_dir, params, export.metadata_of(spec, fingerprint, bert))


def main(argv: Sequence[str] | None = None) -> epath.Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--adapter", type=cli.absolute_path, required=True,
                        help="the AdapterHub adapter's folder (local or gs://)")
    parser.add_argument("--out", type=cli.absolute_path, required=True,
                        help="the export folder to write (adapters.safetensors there); <workdir>/export to predict")
    parser.add_argument("--task", choices=sorted(tasks.GLUE_TASKS), help="the GLUE task (default: the adapter's)")
    parser.add_argument("--model", help="the base model's folder or hub name (default: the adapter's model_name)")
    parser.add_argument("--max_seq_length", type=int, help=f"default: the adapter's, else {DEFAULT_MAX_SEQ_LENGTH}")
    args = parser.parse_args(argv)
    with cli.exit_codes(OSError):
        path = convert(args.adapter, args.out, task=args.task, model=args.model,
                       max_seq_length=args.max_seq_length)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
