"""Training-step speed and peak memory: adapters vs full fine-tuning, and the AdapterHub reference.

Times compiled training steps at batch 32 x 128 tokens on the offline MiniLM model (real RTE
batches), each setting in its own process so peak memory is its own. Then, on real data, one epoch
of adapter training with dev evaluation per task (SST-2 cut to --epoch_train_examples), packed vs
bucketed, compilation included. From the repository root:

    python -m scripts.benchmark                      # adapters and full, plus the peer if set up
    python -m scripts.benchmark --steps=10 --peer_python=~/.cache/adapter-peer-venv/bin/python
    python -m scripts.benchmark --steps=0 --epoch_tasks=rte   # the real-data epochs alone, RTE only

The peer is ../shared/bench/peer/train_adapterhub.py (PyTorch, AdapterHub `adapters`), run through
scripts.peer with the same model, batch, sequence length and adapter size, padded to 128 as here.
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from absl import app, flags

from adapter_jax import run_utils
from scripts import peer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_enum("only", None, ["adapters", "full"], "Measure one mode in this process (used by the driver).")
flags.DEFINE_integer("steps", 8, "Timed steps after compilation and one warm-up step (0: skip the fixed-shape table).")
flags.DEFINE_list("epoch_tasks", ["sst2", "rte"], "Tasks whose real epoch is timed, packed vs bucketed (empty: none).")
flags.DEFINE_integer("epoch_train_examples", 5000, "Training examples of a timed epoch at most (a fixed subset).")
flags.DEFINE_string("epoch", None, "TASK:packed or TASK:bucketed: time that epoch in this process (used by the driver).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("seq_length", 128, "Tokens per example (every batch padded to this).")
flags.DEFINE_integer("adapter_size", 64, "Adapter bottleneck size.")
run_utils.define_path_flag("glue_dir", os.environ.get("GLUE_DIR", str(REPO_ROOT.parent / "shared" / "data" / "glue")),
                           "GLUE folder (RTE batches are timed).")
flags.DEFINE_string("peer_python", peer.DEFAULT_PEER_PYTHON,
                    "Python of the peer's virtual environment (made by its setup.sh); skipped if missing.")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(mode: str) -> dict:
    """Examples/s of compiled training steps in `mode`, in this process."""
    import jax

    from adapter_jax import experiment, input_pipeline, optim, steps
    from configs import glue

    config = glue.get_config("rte")
    config.glue_dir = FLAGS.glue_dir
    config.mode = mode
    config.adapter_size = FLAGS.adapter_size
    config.max_seq_length = FLAGS.seq_length
    config.buckets = (FLAGS.seq_length,)  # time the full length, as the task asks
    config.global_batch_size = FLAGS.batch_size
    setup = experiment.build(config)
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    dataset = experiment.load_dataset(config, setup.task, "train", tokenizer)
    iterator = input_pipeline.TrainIterator(
        dataset, global_batch_size=FLAGS.batch_size, num_devices=jax.local_device_count(), seed=0,
        buckets=tuple(config.buckets),
    )
    tx = optim.create_optimizer(learning_rate=config.learning_rate, total_steps=1000)
    p_step = steps.pmapped_train_step(setup.model, tx, setup.task.is_regression)
    p_state = steps.replicate(steps.initial_state(setup.trainable_params, tx, seed=0))
    p_frozen = steps.replicate(setup.frozen_params)
    batches = [next(iterator) for _ in range(FLAGS.steps + 1)]
    compile_start = time.perf_counter()
    p_state, metrics = p_step(p_state, p_frozen, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for batch in batches[1:]:
        p_state, metrics = p_step(p_state, p_frozen, batch)
    jax.block_until_ready((p_state, metrics))
    elapsed = time.perf_counter() - start
    counts = setup.parameter_summary()
    return {
        "system": "adapter-jax",
        "mode": mode,
        "examples_per_s": FLAGS.steps * FLAGS.batch_size / elapsed,
        "step_s": elapsed / FLAGS.steps,
        "first_step_s_with_compile": compile_s,
        "peak_rss_mib": _peak_rss_mib(),
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "devices": jax.local_device_count(),
        "jax": jax.__version__,
    }


def measure_epoch(task_name: str, packing: bool) -> dict:
    """Seconds of one training epoch of adapters (compilations included) and of dev evaluation, in this process."""
    import itertools

    import jax

    from adapter_jax import evaluation, experiment, input_pipeline, optim, steps
    from configs import glue

    config = glue.get_config(task_name)
    config.glue_dir = FLAGS.glue_dir
    config.adapter_size = FLAGS.adapter_size
    config.max_seq_length = FLAGS.seq_length
    config.global_batch_size = FLAGS.batch_size
    config.max_train_examples = FLAGS.epoch_train_examples
    config.packing = packing
    setup = experiment.build(config)
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    train_data = experiment.load_dataset(config, setup.task, "train", tokenizer)
    dev_data = {split: experiment.load_dataset(config, setup.task, split, tokenizer) for split in setup.task.dev_splits}
    iterator = input_pipeline.TrainIterator(
        train_data, global_batch_size=config.global_batch_size, num_devices=jax.local_device_count(), seed=0,
        buckets=tuple(config.buckets), packing=packing,
    )
    batches = list(itertools.islice(iterator, iterator.steps_per_epoch))  # made before the clock starts
    stats = input_pipeline.batch_stats(batches)
    tx = optim.create_optimizer(learning_rate=config.learning_rate, total_steps=len(batches))
    p_step = steps.pmapped_train_step(setup.model, tx, setup.task.is_regression)
    p_state = steps.replicate(steps.initial_state(setup.trainable_params, tx, seed=0))
    p_frozen = steps.replicate(setup.frozen_params)
    evaluator = evaluation.Evaluator(setup, config)
    start = time.perf_counter()
    for batch in batches:
        p_state, metrics = p_step(p_state, p_frozen, batch)
    jax.block_until_ready((p_state, metrics))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluator.evaluate(p_state.params, p_frozen, dev_data, setup.task)
    return {
        "task": setup.task.name,
        "layout": "packed" if packing else "bucketed",
        "train_examples": len(batches) * config.global_batch_size,
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "padded_fraction": stats.padded_fraction,
        "train_shapes": stats.compiled_shapes,
        "dev": results[setup.task.dev_splits[0]],
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run_self(*flag_args: str) -> dict:
    command = [sys.executable, "-m", "scripts.benchmark", *flag_args, f"--steps={FLAGS.steps}",
               f"--batch_size={FLAGS.batch_size}", f"--seq_length={FLAGS.seq_length}",
               f"--adapter_size={FLAGS.adapter_size}", f"--glue_dir={FLAGS.glue_dir}",
               f"--epoch_train_examples={FLAGS.epoch_train_examples}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def _print_epochs() -> None:
    print(f"\nreal data: one epoch of adapters at batch {FLAGS.batch_size}, rows of {FLAGS.seq_length} tokens, "
          "then dev; compilation included")
    for task_name in FLAGS.epoch_tasks:
        for layout in ("packed", "bucketed"):
            row = _run_self(f"--epoch={task_name}:{layout}")
            print(f"{row['task']:5s} {row['layout']:8s} {row['train_examples']:5d} examples: train {row['train_s']:6.1f} s "
                  f"({row['train_examples'] / row['train_s']:5.1f} ex/s), dev {row['eval_s']:5.1f} s, "
                  f"padded {row['padded_fraction']:.1%}, {row['train_shapes']} shapes, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB, dev {row['dev']}")


def _run_peer(full: bool) -> dict:
    return peer.run(peer.peer_command(
        python=os.path.expanduser(FLAGS.peer_python), task="rte", data_dir=pathlib.Path(FLAGS.glue_dir) / "RTE",
        full=full, learning_rate=3e-5 if full else 3e-3, adapter_size=FLAGS.adapter_size,
        batch_size=FLAGS.batch_size, max_seq_length=FLAGS.seq_length, pad="max_length",
        max_steps=FLAGS.steps + 3, evaluate=False,  # the peer times steps after its first 3
    ))


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.only:
        print(json.dumps(measure(FLAGS.only)))
        return
    if FLAGS.epoch:
        task_name, layout = FLAGS.epoch.split(":")
        print(json.dumps(measure_epoch(task_name, packing=layout == "packed")))
        return
    if FLAGS.steps:
        _print_steps()
    if FLAGS.epoch_tasks:
        _print_epochs()


def _print_steps() -> None:
    rows = [_run_self("--only=adapters"), _run_self("--only=full")]
    speedup = rows[0]["examples_per_s"] / rows[1]["examples_per_s"]
    print(f"batch {FLAGS.batch_size} x {FLAGS.seq_length} tokens, {FLAGS.steps} timed steps, MiniLM-L6-H384")
    for row in rows:
        print(f"adapter-jax {row['mode']:9s} {row['examples_per_s']:7.1f} ex/s  {row['step_s']:.3f} s/step  "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB  trainable {row['trainable_params']:,}")
    print(f"adapters / full speed-up: {speedup:.2f}x")
    if pathlib.Path(os.path.expanduser(FLAGS.peer_python)).exists():
        for full in (False, True):
            peer = _run_peer(full)
            print(f"AdapterHub  {peer['mode']:9s} {json.dumps(peer)}")
    else:
        print(f"peer skipped: {FLAGS.peer_python} not found (run ../shared/bench/peer/setup.sh)")


if __name__ == "__main__":
    app.run(main)
