"""Trains with the AdapterHub reference trainer (../shared/bench/peer/, run by adapter_jax.reference) at our
settings, batch 32, 128 tokens. Its result becomes a results.jsonl line in our schema (source "adapterhub"), so
scripts.report puts it in the same table. From the repository root:

    python -m scripts.peer --task=rte --mode=adapters --learning_rate=3e-3 --results=docs/results/peer.jsonl
"""

import json
import pathlib
import tempfile
from typing import Any

from absl import app, flags

from adapter_jax import cli, reference, tasks
from adapter_jax.results import RunResult

# The peer's metric names -> ours.
_METRIC_NAMES = {"matthews_correlation": "matthews_corr", "spearmanr": "spearman"}


def to_result(peer: dict[str, Any], task: tasks.Task, adapter_size: int, max_train_examples: int) -> RunResult:
    """The peer's output as a result in our schema (a results.RunResult)."""
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
flags.DEFINE_string("task", "rte", "GLUE task.")
flags.DEFINE_enum("mode", "adapters", ["adapters", "full"], "Adapters (+LayerNorms, head) or full fine-tuning.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("epochs", 3, "Epochs.")
flags.DEFINE_integer("adapter_size", 64, "Adapter size.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_integer("max_train_examples", 0, "Train on our fixed subset of this size (0: all).")
cli.define_path_flag("glue_dir", reference.DEFAULT_GLUE_DIR,
                     "GLUE folder.")
flags.DEFINE_string("peer_python", reference.DEFAULT_PEER_PYTHON,
                    "Python of the peer's venv (../shared/bench/peer/setup.sh).")
cli.define_path_flag("results", None, "results.jsonl to append the peer's result to.")


def main(argv: list[str]) -> None:
    del argv
    task = tasks.get_task(FLAGS.task)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = reference.subset_folder(task, FLAGS.glue_dir, FLAGS.max_train_examples, pathlib.Path(scratch))
        peer = reference.run(reference.peer_command(
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
    app.run(main)
