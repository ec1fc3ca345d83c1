"""Training-step speed and peak memory: adapters vs full fine-tuning, and the AdapterHub reference.

Times compiled training steps at batch 32 x 128 tokens on the offline MiniLM model (real RTE
batches), each setting in its own process so peak memory is its own. From the repository root:

    python -m scripts.benchmark                      # adapters and full, plus the peer if set up
    python -m scripts.benchmark --steps=10 --peer_python=~/.cache/adapter-peer-venv/bin/python

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
flags.DEFINE_integer("steps", 8, "Timed steps after compilation and one warm-up step.")
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


def _run_self(mode: str) -> dict:
    command = [sys.executable, "-m", "scripts.benchmark", f"--only={mode}", f"--steps={FLAGS.steps}",
               f"--batch_size={FLAGS.batch_size}", f"--seq_length={FLAGS.seq_length}",
               f"--adapter_size={FLAGS.adapter_size}", f"--glue_dir={FLAGS.glue_dir}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


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
    rows = [_run_self("adapters"), _run_self("full")]
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
