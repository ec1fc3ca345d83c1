"""Mixed-task serving speed: examples/s of one batch drawn from 1, 4, 16 and 64 tasks through an AdapterBank.

Beside it: the single-task model on the same batch (the figure to stay near), each task's examples run as a
batch of their own through that model (the way other libraries serve several adapters), and the bank with
each example's parameters picked by a one-hot einsum over the slots instead of a gather (the mechanism
bank.py did not choose). MiniLM, adapters of size 64, real RTE dev examples padded to the full length.
From the repository root:

    python -m scripts.bank_benchmark [--batch_size=64 --seq_length=128 --repeats=3]
"""

import functools
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from adapter_jax import bank as bank_lib
from adapter_jax import experiment, export, input_pipeline

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
flags.DEFINE_integer("seq_length", 128, "Tokens per example (every batch padded to this).")
flags.DEFINE_integer("adapter_size", 64, "Adapter bottleneck size of every task.")
flags.DEFINE_list("task_counts", ["1", "4", "16", "64"], "Distinct tasks in the batch.")
flags.DEFINE_integer("repeats", 3, "Timed calls per figure, after a warm-up call; the best is kept.")
flags.DEFINE_string("glue_dir", os.environ.get("GLUE_DIR", str(REPO_ROOT.parent / "shared" / "data" / "glue")),
                    "GLUE folder (RTE dev examples are scored).")


def _examples_per_second(call, examples: int) -> float:
    jax.block_until_ready(call())  # compiles
    best = min(_timed(call) for _ in range(FLAGS.repeats))
    return examples / best


def _timed(call) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def _one_hot_logits(model, shared, slots, slot_ids, input_ids, token_type_ids, attention_mask):
    """The alternative to gathering: each example's parameters as a one-hot combination of every slot."""
    capacity = jax.tree.leaves(slots)[0].shape[0]
    one_hot = jax.nn.one_hot(slot_ids, capacity, dtype=jnp.float32)
    example_params = jax.tree.map(lambda stacked: jnp.einsum("bt,t...->b...", one_hot, stacked), slots)
    return bank_lib.per_example_logits(model, shared, example_params, input_ids, token_type_ids, attention_mask)


def main(argv: list[str]) -> None:
    del argv
    from configs import glue

    counts = [int(count) for count in FLAGS.task_counts]
    config = glue.get_config("rte")
    config.glue_dir = FLAGS.glue_dir
    config.adapter_size = FLAGS.adapter_size
    config.max_seq_length = FLAGS.seq_length
    setup = experiment.build(config)
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    dev = experiment.load_dataset(config, setup.task, "dev", tokenizer)
    rows = np.arange(FLAGS.batch_size) % len(dev)
    input_ids, token_type_ids = dev.input_ids[rows], dev.token_type_ids[rows]
    lengths = np.full(FLAGS.batch_size, FLAGS.seq_length)  # time the full length, as scripts.benchmark does
    mask = np.ones_like(input_ids)

    bank = bank_lib.AdapterBank(
        config.model, capacity=max(counts), max_adapter_size=FLAGS.adapter_size, max_seq_length=FLAGS.seq_length,
        batch_sizes=(FLAGS.batch_size,), buckets=(FLAGS.seq_length,),
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for task in range(max(counts)):
            trained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.01, np.shape(x)).astype(np.float32),
                                   setup.trainable_params)
            bank.load(f"task{task}", export.write(f"{folder}/{task}", trained, export.metadata(setup)))

    single = jax.jit(lambda params, ids, types, m: setup.model.apply({"params": params}, ids, types, m))
    params = setup.params
    print(f"CPU: {_cpu_name()}; {jax.device_count()} JAX devices ({jax.devices()[0].platform}); MiniLM, adapters "
          f"{FLAGS.adapter_size}, batch {FLAGS.batch_size} x {FLAGS.seq_length} tokens, best of {FLAGS.repeats}")
    single_rate = _examples_per_second(lambda: single(params, input_ids, token_type_ids, mask), FLAGS.batch_size)
    print(f"single-task model, one batch:           {single_rate:7.1f} examples/s")
    one_hot = jax.jit(functools.partial(_one_hot_logits, bank.model))
    for count in counts:
        names = [f"task{i % count}" for i in range(FLAGS.batch_size)]
        slot_ids = jnp.asarray([bank.slot(name).index for name in names])
        groups = np.array_split(np.arange(FLAGS.batch_size), count)
        calls = {
            "gather": lambda: bank.mixed_logits(names, input_ids, token_type_ids, lengths),  # noqa: B023 (timed now)
            "one_hot": lambda: one_hot(bank.shared_params, bank.slot_params, slot_ids, input_ids,  # noqa: B023
                                       token_type_ids, mask),
            "separate": lambda: [single(params, input_ids[g], token_type_ids[g], mask[g]) for g in groups],  # noqa: B023
        }
        rate = {name: _examples_per_second(call, FLAGS.batch_size) for name, call in calls.items()}
        print(f"{count:2d} tasks: bank (gather) {rate['gather']:7.1f} ({rate['gather'] / single_rate:6.1%} of "
              f"single-task), one-hot einsum {rate['one_hot']:7.1f}, one batch per task {rate['separate']:7.1f} "
              "examples/s")


def _cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    app.run(main)
