"""The AdapterHub reference trainer (../shared/bench/peer/train_adapterhub.py: PyTorch, AdapterHub `adapters`),
run in its own virtual environment with our settings: scripts/peer.py trains with it, scripts/benchmark.py times
it beside us.

The peer is set to what our config does: GELU adapters of the same size at both sites, LayerNorms trained, a
dense-tanh-linear head on [CLS] (AdapterHub's default, the counterpart of BERT's pooler + classifier when the
pooler trains), AdamW with weight decay 0.01, 10% warmup then linear decay.
"""

import json
import os
import pathlib
import subprocess
from typing import Any

from etils import epath

from adapter_jax import glue_data, tasks
from adapter_jax.workdir import is_remote

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO_ROOT.parent / "shared" / "bench" / "peer" / "train_adapterhub.py"
DEFAULT_PEER_PYTHON = os.path.expanduser(os.environ.get("PEER_VENV", "~/.cache/adapter-peer-venv") + "/bin/python")
# The GLUE folder the benchmark scripts read by default: $GLUE_DIR, else the one beside the reference's bench.
DEFAULT_GLUE_DIR = os.environ.get("GLUE_DIR", str(REPO_ROOT.parent / "shared" / "data" / "glue"))
HIDDEN_SIZE = 384  # MiniLM-L6-H384, the only model the peer loads


def peer_command(
    *,
    python: str,
    task: str,
    data_dir: pathlib.Path,
    full: bool,
    learning_rate: float,
    epochs: float = 3,
    adapter_size: int = 64,
    batch_size: int = 32,
    max_seq_length: int = 128,
    pad: str = "longest",
    seed: int = 0,
    max_steps: int = 0,
    evaluate: bool = True,
) -> list[str]:
    command = [
        python, str(PEER_SCRIPT), f"--task={task}", f"--data={data_dir}", f"--lr={learning_rate}",
        f"--epochs={epochs}", f"--batch-size={batch_size}", f"--max-seq-len={max_seq_length}", f"--pad={pad}",
        f"--seed={seed}", f"--max-steps={max_steps}", "--head-layers=2", "--weight-decay=0.01",
        "--warmup-ratio=0.1", "--threads=2",
    ]
    if not evaluate:
        command.append("--no-eval")
    if full:
        command.append("--full")
    else:
        command += [f"--reduction-factor={HIDDEN_SIZE / adapter_size}", "--non-linearity=gelu", "--train-layer-norms"]
    return command


def run(command: list[str]) -> dict[str, Any]:
    """Runs the peer and returns its final JSON line."""
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def subset_folder(task: tasks.Task, glue_dir: str, max_train_examples: int, out_root: pathlib.Path) -> pathlib.Path:
    """A local task folder whose train.tsv holds the same fixed subset our config.max_train_examples picks (0:
    all): the GLUE folder's own where it is local and whole, else a copy in `out_root` (the peer reads no gs://)."""
    source = epath.Path(glue_dir) / task.dir_name
    if not max_train_examples and not is_remote(glue_dir):
        return pathlib.Path(source)
    lines = (source / "train.tsv").read_text().splitlines()
    header, rows = ([], lines) if task.headerless_columns else ([lines[0]], lines[1:])
    keep = glue_data.train_subset_indices(len(rows), max_train_examples or len(rows))
    folder = out_root / task.dir_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join(header + [rows[i] for i in keep]) + "\n")
    for split in task.dev_splits:
        (folder / task.splits[split]).write_text((source / task.splits[split]).read_text())
    return folder
