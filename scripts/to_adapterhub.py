r"""An adapter-jax export as an AdapterHub adapter folder, or (runs without adapters) a Hugging Face model folder:

    python -m scripts.to_adapterhub --workdir=/tmp/adapter-jax/rte --out=/tmp/rte-adapterhub [--name=rte]
    python -m scripts.to_adapterhub --workdir=/tmp/rte-full --out=/tmp/rte-hf --format=hf

The AdapterHub folder is what `model.load_adapter(DIR)` of `adapters` 1.x loads: adapter_config.json, head_config.json
and the weights (pytorch_adapter.bin + pytorch_model_head.bin where torch is installed, else adapter.safetensors +
model_head.safetensors, loaded with use_safetensors=True). Base-model weights that trained here (the LayerNorms of
Houlsby adapters, a trained pooler) go to trained_base_weights.safetensors beside them, and README.md there gives the
PyTorch lines that load both. `--format=hf` (modes full, top_k, layernorm) writes a BertForSequenceClassification
folder that transformers loads as it is. The base model is the export's own (--model names another folder holding
the same weights). The run may be in a bucket (--workdir=gs://...); the folder is written locally, where PyTorch
loads it.
"""

import argparse
import pathlib
import sys
from collections.abc import Sequence

from etils import epath

from adapter_jax import adapterhub, cli, export, tasks, trainable, weights
from adapter_jax.errors import CheckpointError

_LOAD_LINES = """```python
import safetensors.torch
from adapters import AutoAdapterModel

model = AutoAdapterModel.from_pretrained("{base}")  # the base model: {model}
name = model.load_adapter("{folder}", set_active=True{load_args})
{side_lines}model.eval()
```"""
_SIDE_LINES = """# Base-model weights trained with the adapter ({what}); without them the logits change.
side = safetensors.torch.load_file("{folder}/{side_file}")
missing, unexpected = model.load_state_dict(side, strict=False)
assert not unexpected, unexpected
"""


def loss_warning(hub: adapterhub.HubAdapter) -> str:
    """What a plain `load_adapter` of the folder leaves out, or "" when nothing."""
    if not hub.side:
        return ""
    return (f"note: a plain model.load_adapter() loads the adapter and head but not the {len(hub.side)} trained "
            f"base-model tensors ({_side_contents(hub)}) of {adapterhub.SIDE_FILE}; load that file too "
            f"(README.md there), or the logits differ")


def _side_contents(hub: adapterhub.HubAdapter) -> str:
    layer_norms = sum("LayerNorm" in key for key in hub.side)
    parts = [f"{layer_norms} LayerNorm tensors"] if layer_norms else []
    return ", ".join(parts + (["the pooler"] if len(hub.side) > layer_norms else []))


def readme(hub: adapterhub.HubAdapter, folder: pathlib.Path, base: pathlib.Path, model: str, use_torch: bool,
           max_seq_length: int) -> str:
    """The folder's README.md: what it holds and the exact lines that load it in PyTorch."""
    side_lines = _SIDE_LINES.format(what=_side_contents(hub), folder=folder, side_file=adapterhub.SIDE_FILE)
    lines = _LOAD_LINES.format(base=base, model=model, folder=folder,
                               load_args="" if use_torch else ", use_safetensors=True",
                               side_lines=side_lines if hub.side else "")
    name = hub.adapter_config["name"]
    return (f"# AdapterHub adapter `{name}` (exported by adapter-jax)\n\n"
            f"A Houlsby adapter (`DoubleSeqBnConfig`, exact GELU) with its classification head, for `adapters` 1.x. "
            f"Examples were tokenized as BERT sentence pairs truncated to {max_seq_length} tokens.\n\n{lines}\n")


def convert(path: epath.PathLike, out_dir: pathlib.Path, *, name: str | None = None, output_format: str = "adapterhub",
            model: str | None = None, use_torch: bool | None = None) -> list[pathlib.Path]:
    """Writes the export at `path` (file, its folder or the run's workdir; local or gs://) to the local folder
    `out_dir`; returns the files written."""
    exported = export.read(path)
    folder = weights.open_model_folder(model or exported.spec.model)
    bert_config, base = weights.load_pretrained(folder)
    export.check_fits(exported, model=model or exported.spec.model, base_fingerprint=weights.fingerprint(base),
                      bert_config=bert_config)
    if output_format == "hf":
        if exported.spec.mode == "adapters":
            raise CheckpointError(f"mode: {exported.source} holds adapters, which a Hugging Face "
                                  f"BertForSequenceClassification cannot; use --format=adapterhub")
        params = trainable.merge(exported.params, {"bert": base})
        labels = tasks.get_task(exported.spec.task).labels
        weights.export_for_classification(bert_config, params, labels, out_dir, folder.path)
        return sorted(out_dir.iterdir())
    if use_torch is None:
        use_torch = _torch_installed()
    hub = adapterhub.to_hub(
        exported.params, exported.spec, base["pooler"], name=name or exported.spec.task,
        hidden_size=bert_config.hidden_size, num_layers=bert_config.num_hidden_layers,
        metadata=export.read_raw(path)[1],
    )
    files = adapterhub.write_folder(hub, out_dir, use_torch=use_torch)
    text = readme(hub, out_dir, folder.path, exported.spec.model, use_torch, exported.spec.max_seq_length)
    (out_dir / adapterhub.README_FILE).write_text(text, encoding="utf-8")
    warning = loss_warning(hub)
    if warning:
        print(warning, file=sys.stderr)
    return [*files, out_dir / adapterhub.README_FILE]


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=cli.absolute_path, help="a finished run (holding export/); local or gs://")
    source.add_argument("--export", type=cli.absolute_path,
                        help="an export file (adapters.safetensors); local or gs://")
    parser.add_argument("--out", type=cli.absolute_path, required=True, help="the local folder to write")
    parser.add_argument("--name", help="the adapter's name in AdapterHub (default: the task)")
    parser.add_argument("--format", choices=("adapterhub", "hf"), default="adapterhub",
                        help="adapterhub (adapters mode) or hf: a transformers model folder (full, top_k, layernorm)")
    parser.add_argument("--model", help="the base model's folder or hub name (default: the export's)")
    parser.add_argument("--safetensors", action="store_true",
                        help="safetensors weights even where torch is installed (load with use_safetensors=True)")
    args = parser.parse_args(argv)
    if cli.is_remote(args.out):
        # The folder's README gives load lines for this path, and PyTorch's loaders read local files.
        parser.error(f"--out={args.out}: must be a local folder (load_adapter and from_pretrained read local "
                     f"files); write it here, then copy it where it is needed")
    with cli.exit_codes(OSError):
        files = convert(args.workdir or args.export, pathlib.Path(args.out), name=args.name,
                        output_format=args.format, model=args.model, use_torch=False if args.safetensors else None)
    print(f"wrote {len(files)} files to {args.out}")
    return files


if __name__ == "__main__":
    main()
