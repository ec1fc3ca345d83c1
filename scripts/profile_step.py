"""Where a training step's time goes on CPU: XLA's own trace of the fixed-shape benchmark step, per operation.

Traces a few compiled steps (batch 32 x 128, MiniLM, real RTE batches, as scripts.benchmark times them)
with jax.profiler, then adds up each XLA operation's time (its thunk's events) and groups operations by
kind and output shape; matmuls also show their FLOPs and rate. From the repository root:

    python -m scripts.profile_step                  # the adapter step
    python -m scripts.profile_step --mode=full --top=30

Times are thunk time per step: an operation spread over both cores counts once, operations running side
by side count each, so the total can exceed the wall time a little.
"""

import collections
import glob
import os
import re
import tempfile

# Before JAX loads: XLA:CPU records one trace event per operation only when asked.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

from absl import app, flags

from adapter_jax import benchmarking, cli, reference
from configs import glue

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "adapters", ["adapters", "full"], "Which step to profile.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("seq_length", 128, "Tokens per example (every batch padded to this).")
flags.DEFINE_integer("adapter_size", 64, "Adapter bottleneck size.")
cli.define_path_flag("glue_dir", reference.DEFAULT_GLUE_DIR,
                     "GLUE folder (RTE batches are traced).")
flags.DEFINE_integer("traced_steps", 3, "Steps traced after one untraced step.")
flags.DEFINE_integer("top", 15, "Rows printed.")


def operation_times(trace_dir: str) -> collections.Counter:
    """Nanoseconds per XLA operation name, summed over the XLA:CPU worker threads' events."""
    from jax.profiler import ProfileData

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    totals[event.name] += event.duration_ns
    return totals


def main(argv: list[str]) -> None:
    del argv
    import jax

    config = glue.get_config("rte")
    config.update(mode=FLAGS.mode, glue_dir=FLAGS.glue_dir, adapter_size=FLAGS.adapter_size,
                  max_seq_length=FLAGS.seq_length, global_batch_size=FLAGS.batch_size)
    step = benchmarking.fixed_shape_step(config, FLAGS.traced_steps + 1)
    p_state, metrics = step.compiled(step.p_state, step.p_frozen, step.batches[0])
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for batch in step.batches[1:]:
                p_state, metrics = step.compiled(p_state, step.p_frozen, batch)
            jax.block_until_ready((p_state, metrics))
        times = operation_times(trace_dir)

    computations, instructions = benchmarking.hlo_computations(step.compiled.as_text())
    groups = collections.defaultdict(lambda: [0.0, 0.0, 0])  # key -> [ms per step, GFLOP per step, count]
    for name, nanoseconds in times.items():
        if name not in instructions:
            continue
        shape, line = instructions[name]
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = computations.get(called.group(1), []) if called else [line]
        flops = benchmarking.dot_flops(body, instructions)
        kind = "matmul" if flops else re.sub(r"[.]\d+$", "", name)  # fusion.12 -> fusion
        key = f"{kind} -> {shape.split('{')[0]}"
        group = groups[key]
        group[0] += nanoseconds / 1e6 / FLAGS.traced_steps
        group[1] += flops / 1e9
        group[2] += 1
    total_ms = sum(group[0] for group in groups.values())
    matmul_ms = sum(group[0] for group in groups.values() if group[1])
    print(f"{FLAGS.mode} step, batch {FLAGS.batch_size} x {FLAGS.seq_length}, CPU: {benchmarking.cpu_description()}")
    print(f"thunk time {total_ms:.0f} ms/step, of which matmuls {matmul_ms:.0f} ms ({matmul_ms / total_ms:.0%})")
    print(f"{'ms/step':>8s} {'share':>6s} {'ops':>4s} {'GFLOP':>6s} {'GFLOP/s':>8s}  operation -> output")
    for key, (ms, gflop, count) in sorted(groups.items(), key=lambda item: -item[1][0])[: FLAGS.top]:
        rate = f"{gflop / ms * 1e3:8.0f}" if gflop else f"{'':8s}"
        print(f"{ms:8.1f} {ms / total_ms:6.1%} {count:4d} {gflop:6.1f} {rate}  {key}")


if __name__ == "__main__":
    app.run(main)
