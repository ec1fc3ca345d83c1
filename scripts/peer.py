"""Runs the AdapterHub reference trainer (../shared/bench/peer/) with our settings, side by side.

The peer (PyTorch, AdapterHub `adapters`) is set to what our config does: GELU adapters of the same
size at both sites, LayerNorms trained, a dense-tanh-linear head on [CLS] (AdapterHub's default, the
counterpart of BERT's pooler + classifier when the pooler trains), AdamW with weight decay 0.01,
10% warmup then linear decay, batch 32, 128 tokens. Its result becomes a results.jsonl line in our
schema (a results.RunResult, source "adapterhub"), so scripts.report puts it in the same table. From the
repository root:

    python -m scripts.peer --task=rte --mode=adapters --learning_rate=3e-3 --results=docs/results/peer.jsonl
"""

import json
import os
import pathlib
import subprocess
import tempfile
from typing import Any

from absl import app, flags

from adapter_jax import input_pipeline, run_utils, tasks
from adapter_jax.results import RunResult

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO_ROOT.parent / "shared" / "bench" / "peer" / "train_adapterhub.py"
DEFAULT_PEER_PYTHON = os.path.expanduser(os.environ.get("PEER_VENV", "~/.cache/adapter-peer-venv") + "/bin/python")
HIDDEN_SIZE = 384  # MiniLM-L6-H384, the only model the peer loads
# The peer's metric names -> ours.
_METRIC_NAMES = {"matthews_correlation": "matthews_corr", "spearmanr": "spearman"}


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
    """A task folder whose train.tsv holds the same fixed subset our config.max_train_examples picks."""
    source = pathlib.Path(glue_dir) / task.dir_name
    if not max_train_examples:
        return source
    lines = (source / "train.tsv").read_text().splitlines()
    header, rows = ([], lines) if task.headerless_columns else ([lines[0]], lines[1:])
    keep = input_pipeline.train_subset_indices(len(rows), max_train_examples)
    folder = out_root / task.dir_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join(header + [rows[i] for i in keep]) + "\n")
    for split in task.dev_splits:
        (folder / task.splits[split]).write_text((source / task.splits[split]).read_text())
    return folder


def to_result(peer: dict[str, Any], task: tasks.Task, adapter_size: int, max_train_examples: int) -> RunResult:
    """The peer's output as a result in our schema."""
    dev = {_METRIC_NAMES.get(k, k): v for k, v in peer["dev"].items()}
    return RunResult(
        task=task.name,
        mode="full" if peer["mode"] == "full" else "adapters",
        model=peer["model"],
        adapter_size=0 if peer["mode"] == "full" else adapter_size,
        learning_rate=peer["lr"],
        num_epochs=peer["epochs"],
        seed=peer["seed"],
        top_k=0,
        main_metric=task.main_metric,
        score=dev[task.main_metric],
        dev_metrics=dev,
        total_params=peer["total_params"],
        trainable_params=peer["trainable_params"],
        # over the base model's parameters, as ours: total less what the adapters and head add
        trainable_fraction=peer["trainable_params"] / (
            peer["total_params"] - peer["trainable_breakdown"]["adapter"] - peer["trainable_breakdown"]["head"]
        ),
        wall_time_s=peer["wall_s"],
        train_examples_per_s=peer["train_examples_per_s"],
        max_train_examples=max_train_examples,
        source="adapterhub",
        library=peer["library"],
    )


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the command line only: scripts.benchmark imports this module with flags of its own."""
    flags.DEFINE_string("task", "rte", "GLUE task.")
    flags.DEFINE_enum("mode", "adapters", ["adapters", "full"], "Adapters (+LayerNorms, head) or full fine-tuning.")
    flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
    flags.DEFINE_integer("epochs", 3, "Epochs.")
    flags.DEFINE_integer("adapter_size", 64, "Adapter size.")
    flags.DEFINE_integer("seed", 0, "Seed.")
    flags.DEFINE_integer("max_train_examples", 0, "Train on our fixed subset of this size (0: all).")
    run_utils.define_path_flag("glue_dir", os.environ.get("GLUE_DIR", str(REPO_ROOT.parent / "shared" / "data" / "glue")),
                               "GLUE folder.")
    flags.DEFINE_string("peer_python", DEFAULT_PEER_PYTHON, "Python of the peer's venv (../shared/bench/peer/setup.sh).")
    run_utils.define_path_flag("results", None, "results.jsonl to append the peer's result to.")


def main(argv: list[str]) -> None:
    del argv
    task = tasks.get_task(FLAGS.task)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = subset_folder(task, FLAGS.glue_dir, FLAGS.max_train_examples, pathlib.Path(scratch))
        peer = run(peer_command(
            python=FLAGS.peer_python, task=task.name, data_dir=data_dir, full=FLAGS.mode == "full",
            learning_rate=FLAGS.learning_rate, epochs=FLAGS.epochs, adapter_size=FLAGS.adapter_size,
            seed=FLAGS.seed,
        ))
    line = json.dumps(to_result(peer, task, FLAGS.adapter_size, FLAGS.max_train_examples).to_dict())
    print(line)
    if FLAGS.results:
        with open(FLAGS.results, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
