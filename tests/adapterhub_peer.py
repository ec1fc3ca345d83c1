"""Run by test_adapterhub.py with the reference environment's Python (AdapterHub `adapters` 1.3, PyTorch): loads
adapter folders as their README.md says and writes their logits over given token ids, and trains an AdapterHub
Houlsby adapter for a few steps and saves it.

    python adapterhub_peer.py --base=DIR --ids=FILE.npz --out=DIR [--load=FOLDER ...] [--train=FOLDER]

FILE.npz holds input_ids, token_type_ids, lengths and labels (ours, padded). Writes <out>/<i>.side.npy (with the
side file) for the i-th --load, <out>/0.plain.npy (the first without it), and <out>/trained.npy for --train.
"""

import argparse
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import safetensors.torch
import torch
from adapters import AutoAdapterModel, DoubleSeqBnConfig

SIDE_FILE = "trained_base_weights.safetensors"


def logits(model, data, batch_size=64):
    mask = np.arange(data["input_ids"].shape[1])[None] < data["lengths"][:, None]
    outputs = []
    with torch.no_grad():
        for start in range(0, len(mask), batch_size):
            rows = slice(start, start + batch_size)
            columns = slice(0, int(data["lengths"][rows].max()))  # the batch's longest: padding changes nothing
            outputs.append(model(input_ids=torch.from_numpy(data["input_ids"][rows, columns]).long(),
                                 token_type_ids=torch.from_numpy(data["token_type_ids"][rows, columns]).long(),
                                 attention_mask=torch.from_numpy(mask[rows, columns]).long()).logits.numpy())
    return np.concatenate(outputs)


def load(base, folder, with_side):
    """As the folder's README.md says."""
    model = AutoAdapterModel.from_pretrained(base)
    model.load_adapter(str(folder), set_active=True, use_safetensors=not (folder / "pytorch_adapter.bin").exists())
    if with_side and (folder / SIDE_FILE).exists():
        _, unexpected = model.load_state_dict(safetensors.torch.load_file(folder / SIDE_FILE), strict=False)
        assert not unexpected, unexpected
    return model.eval()


def train(base, folder, data, steps=3):
    """A Houlsby adapter and head trained with AdapterHub's own train_adapter (base frozen), saved to `folder`."""
    torch.manual_seed(0)
    model = AutoAdapterModel.from_pretrained(base)
    model.add_adapter("rte", config=DoubleSeqBnConfig(reduction_factor=6.0, non_linearity="gelu"))
    model.add_classification_head("rte", num_labels=2, layers=2, activation_function="tanh", use_pooler=False,
                                  id2label={0: "entailment", 1: "not_entailment"})
    model.train_adapter("rte")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mask = np.arange(data["input_ids"].shape[1])[None] < data["lengths"][:, None]
    for step in range(steps):
        rows = slice(16 * step, 16 * step + 16)
        loss = model(input_ids=torch.from_numpy(data["input_ids"][rows]).long(),
                     token_type_ids=torch.from_numpy(data["token_type_ids"][rows]).long(),
                     attention_mask=torch.from_numpy(mask[rows]).long(),
                     labels=torch.from_numpy(data["labels"][rows]).long()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_adapter(str(folder), "rte")
    return model.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--load", action="append", default=[], type=pathlib.Path)
    parser.add_argument("--train", type=pathlib.Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = dict(np.load(args.ids))
    for index, folder in enumerate(args.load):
        np.save(args.out / f"{index}.side.npy", logits(load(args.base, folder, True), data))
        if index == 0:
            np.save(args.out / f"{index}.plain.npy", logits(load(args.base, folder, False), data))
    if args.train:
        np.save(args.out / "trained.npy", logits(train(args.base, args.train, data), data))


if __name__ == "__main__":
    main()
