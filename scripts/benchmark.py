"""Training speed and peak memory on this machine: ours vs the AdapterHub reference, side by side.

One run prints, for the machine it runs on:
1. the CPU and the measured float32 matmul peak (a 2048^3 product in JAX and in PyTorch; the higher is
   "the peak");
2. compiled training steps at fixed shapes (batch 32 x 128 tokens, MiniLM-L6-H384, real RTE batches),
   adapters and full fine-tuning, ours and the reference's: examples/s, step time, GFLOP/s as a fraction
   of the peak, peak RSS; each setting in its own process, so each peak RSS is its own;
3. real data: one epoch of adapter training with dev evaluation per task (SST-2 cut to
   --epoch_train_examples, RTE whole), ours packed and bucketed vs the reference with dynamic padding,
   compilation and start-up included.
From the repository root:

    python -m scripts.benchmark                                  # everything (about half an hour on 2 cores)
    python -m scripts.benchmark --epoch_tasks=                   # the fixed-shape table alone
    python -m scripts.benchmark --steps=0 --epoch_tasks=rte      # the real-data epochs alone, RTE only
    python -m scripts.benchmark --epoch_tasks= --dtype=bfloat16  # our steps computing in bfloat16

On an accelerator (GPU or TPU) it prints instead, in one process: the device, JAX's version, the device's dense
peak (adapter_jax/device_peaks.py, or --peak_tflops), and for MiniLM-, BERT-base- and BERT-large-shaped models
with random weights (--models), adapters of --adapter_size, float32 and bfloat16, at each of --device_batches
("max": the largest power of two whose compiled step XLA's memory analysis fits in 90% of the device's memory):
examples/s, matmul TFLOP/s, MFU and XLA's peak memory of the compiled step. --results_file also writes each row
as a JSON line.

The reference is ../shared/bench/peer/train_adapterhub.py (PyTorch, AdapterHub `adapters`), run through
adapter_jax.reference with the same model, batch, sequence length and adapter size; skipped if its virtual
environment (made by its setup.sh) is missing. Run on a quiet machine: figures are only comparable
within one run.
"""

import itertools
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import ml_collections
from absl import app, flags

from adapter_jax import benchmarking, cli, device_peaks, reference, tasks
from configs import glue

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MATMUL_SIZE = 2048
# The same measurement in PyTorch, run by the reference's Python with its two threads.
TORCH_MATMUL = f"""
import time, torch
torch.set_num_threads(2)
a, b = torch.randn({MATMUL_SIZE}, {MATMUL_SIZE}), torch.randn({MATMUL_SIZE}, {MATMUL_SIZE})
a @ b
best = float("inf")
for _ in range(10):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
print(torch.__version__, 2 * {MATMUL_SIZE}**3 / best / 1e9)
"""

FLAGS = flags.FLAGS
flags.DEFINE_enum("only", None, ["adapters", "full", "matmul"],
                  "Measure one thing in this process (used by the driver).")
flags.DEFINE_integer("steps", 8, "Timed steps after compilation and one warm-up step (0: skip the fixed-shape table).")
flags.DEFINE_list("epoch_tasks", ["sst2", "rte"], "Tasks whose real epoch is timed (empty: none).")
flags.DEFINE_list("epoch_layouts", ["packed", "bucketed"], "Our layouts timed on real data: packed, bucketed.")
flags.DEFINE_integer("epoch_train_examples", 5000, "Training examples of a timed epoch at most (a fixed subset).")
flags.DEFINE_string("epoch", None, "TASK:packed or TASK:bucketed: time that epoch in this process (used by the driver).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("seq_length", 128, "Tokens per example (every batch padded to this).")
flags.DEFINE_integer("adapter_size", 64, "Adapter bottleneck size.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "CPU tables: the computation dtype of our steps.")
cli.define_path_flag("glue_dir", reference.DEFAULT_GLUE_DIR,
                     "GLUE folder (RTE batches are timed).")
flags.DEFINE_list("models", list(benchmarking.SHAPED_MODELS), "Accelerator table: the shaped models timed.")
flags.DEFINE_list("device_batches", ["32", "max"], "Accelerator table: global batch sizes; 'max' searches.")
flags.DEFINE_integer("max_batch", 4096, "Accelerator table: the largest batch 'max' tries.")
flags.DEFINE_float("peak_tflops", None, "Accelerator table: the device's dense peak per chip in TFLOP/s for both "
                   "dtypes, overriding device_peaks.py's table.")
flags.DEFINE_string("results_file", None, "Accelerator table: also append each row here as a JSON line.")
flags.DEFINE_string("peer_python", reference.DEFAULT_PEER_PYTHON,
                    "Python of the peer's virtual environment (made by its setup.sh); skipped if missing.")


def measure_matmul() -> float:
    """GFLOP/s of the best of ten float32 MATMUL_SIZE^3 products in JAX, in this process."""
    import jax

    a, b = jax.random.normal(jax.random.key(0), (2, MATMUL_SIZE, MATMUL_SIZE))
    product = jax.jit(lambda x, y: x @ y)
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / best / 1e9


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _config(task_name: str) -> ml_collections.ConfigDict:
    """The task's default config at the benchmark's batch size, length, adapter size and GLUE folder."""
    config = glue.get_config(task_name)
    config.update(glue_dir=FLAGS.glue_dir, adapter_size=FLAGS.adapter_size, max_seq_length=FLAGS.seq_length,
                  global_batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
    return config


def measure(mode: str) -> dict:
    """Examples/s of compiled training steps in `mode`, in this process."""
    import jax

    compile_start = time.perf_counter()
    config = _config("rte")
    config.mode = mode
    step = benchmarking.fixed_shape_step(config, FLAGS.steps + 1)
    p_state, metrics = step.compiled(step.p_state, step.p_frozen, step.batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for batch in step.batches[1:]:
        p_state, metrics = step.compiled(p_state, step.p_frozen, batch)
    jax.block_until_ready((p_state, metrics))
    elapsed = time.perf_counter() - start
    return {
        "system": "adapter-jax",
        "mode": mode,
        "examples_per_s": FLAGS.steps * FLAGS.batch_size / elapsed,
        "step_s": elapsed / FLAGS.steps,
        # the matmuls of one device's program (no gradients for frozen weights), times the devices
        "gflop_per_step": step.matmul_flops() * jax.local_device_count() / 1e9,
        "first_step_s_with_setup_and_compile": compile_s,
        "peak_rss_mib": _peak_rss_mib(),
        "xla_peak_mib": benchmarking.step_memory(step.compiled)["peak_bytes"] / 2**20,
        "trainable_params": step.parameter_summary["trainable_params"],
        "total_params": step.parameter_summary["total_params"],
        "devices": jax.local_device_count(),
        "jax": jax.__version__,
    }


def measure_epoch(task_name: str, packing: bool) -> dict:
    """Seconds of one training epoch of adapters (compilations included) and of dev evaluation, in this process."""
    import jax

    from adapter_jax import evaluation, experiment, steps, training_setup

    config = _config(task_name)
    config.max_train_examples = FLAGS.epoch_train_examples
    config.packing = packing
    config.num_epochs = 1
    setup = training_setup.build(config)
    task = setup.experiment.task
    dev_data = experiment.load_dev_datasets(config, task, setup.tokenizer)
    batches = list(itertools.islice(setup.train_iter, setup.total_steps))  # made before the clock starts
    stats = benchmarking.batch_stats(batches)
    evaluator = evaluation.Evaluator(setup.experiment, config)
    p_state = steps.replicate(setup.initial_state)
    start = time.perf_counter()
    for batch in batches:
        p_state, metrics = setup.p_train_step(p_state, setup.p_frozen, batch)
    jax.block_until_ready((p_state, metrics))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluator.evaluate(p_state.params, setup.p_frozen, dev_data, task)
    return {
        "task": task.name,
        "layout": "packed" if packing else "bucketed",
        "train_examples": len(batches) * config.global_batch_size,
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "padded_fraction": stats.padded_fraction,
        "train_shapes": stats.compiled_shapes,
        "dev": results[task.dev_splits[0]],
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run_self(*flag_args: str) -> dict:
    command = [sys.executable, "-m", "scripts.benchmark", *flag_args, f"--steps={FLAGS.steps}",
               f"--batch_size={FLAGS.batch_size}", f"--seq_length={FLAGS.seq_length}",
               f"--adapter_size={FLAGS.adapter_size}", f"--glue_dir={FLAGS.glue_dir}",
               f"--epoch_train_examples={FLAGS.epoch_train_examples}", f"--dtype={FLAGS.dtype}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def _peer_python() -> str | None:
    python = os.path.expanduser(FLAGS.peer_python)
    return python if pathlib.Path(python).exists() else None


def _measure_peaks() -> dict[str, float]:
    """The matmul GFLOP/s of JAX and (if set up) PyTorch, each in a fresh process."""
    peaks = {"JAX": _run_self("--only=matmul")["gflops"]}
    if _peer_python():
        output = subprocess.run([_peer_python(), "-c", TORCH_MATMUL], check=True, capture_output=True, text=True)
        peaks["PyTorch"] = float(output.stdout.split()[-1])
    return peaks


def _print_peaks(when: str, peaks: dict[str, float]) -> None:
    print(f"float32 matmul {MATMUL_SIZE}^3, best of 10, {when}: "
          + ", ".join(f"{name} {gflops:.0f} GFLOP/s" for name, gflops in peaks.items()))


def _run_peer_steps(full: bool) -> dict:
    return reference.run(reference.peer_command(
        python=_peer_python(), task="rte", data_dir=pathlib.Path(FLAGS.glue_dir) / "RTE",
        full=full, learning_rate=3e-5 if full else 3e-3, adapter_size=FLAGS.adapter_size,
        batch_size=FLAGS.batch_size, max_seq_length=FLAGS.seq_length, pad="max_length",
        max_steps=FLAGS.steps + 3, evaluate=False,  # the peer times steps after its first 3
    ))


def _measure_steps() -> tuple[dict, dict]:
    """(ours, the reference's) fixed-shape results per mode, each from its own process, ours and theirs
    alternating so that a drift in the machine's speed touches both alike."""
    ours, theirs = {}, {}
    for mode in ("adapters", "full"):
        ours[mode] = _run_self(f"--only={mode}")
        if _peer_python():
            theirs[mode] = _run_peer_steps(full=mode == "full")
    return ours, theirs


def _print_steps(ours: dict, theirs: dict, peak: float) -> None:
    rows = [("adapter-jax", mode, row["examples_per_s"], row["gflop_per_step"], row["peak_rss_mib"])
            for mode, row in ours.items()]
    if theirs:
        # The same model, batch and trainable set: the same matmuls, counted once (in our step's HLO).
        rows += [("AdapterHub", mode, row["train_examples_per_s"], ours[mode]["gflop_per_step"], row["peak_rss_mib"])
                 for mode, row in theirs.items()]
    print(f"\nfixed shapes: batch {FLAGS.batch_size} x {FLAGS.seq_length} tokens (real RTE batches), "
          f"{FLAGS.steps} timed steps, MiniLM-L6-H384, adapter size {FLAGS.adapter_size}")
    print(f"{'system':11s} {'mode':8s} {'ex/s':>6s} {'s/step':>7s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} "
          f"{'of peak':>7s} {'peak RSS':>9s}")
    for system, mode, examples_per_s, gflop, rss in rows:
        step_s = FLAGS.batch_size / examples_per_s
        print(f"{system:11s} {mode:8s} {examples_per_s:6.1f} {step_s:7.2f} {gflop:10.1f} {gflop / step_s:8.1f} "
              f"{gflop / step_s / peak:7.0%} {rss:6.0f} MiB")
    print("XLA's peak memory of our compiled steps (memory_analysis): " + ", ".join(
        f"{mode} {row['xla_peak_mib']:.0f} MiB" for mode, row in ours.items()) + f" ({FLAGS.dtype})")
    print(f"ours, adapters / full: {ours['adapters']['examples_per_s'] / ours['full']['examples_per_s']:.2f}x")
    for mode, row in theirs.items():
        print(f"ours / AdapterHub, {mode}: {ours[mode]['examples_per_s'] / row['train_examples_per_s']:.2f}x speed, "
              f"{ours[mode]['peak_rss_mib'] / row['peak_rss_mib']:.2f}x peak RSS")
    if not theirs:
        print(f"reference skipped: {FLAGS.peer_python} not found (run ../shared/bench/peer/setup.sh)")


def _run_peer_epoch(task: tasks.Task, scratch: pathlib.Path) -> dict:
    data_dir = reference.subset_folder(task, FLAGS.glue_dir, FLAGS.epoch_train_examples, scratch)
    return reference.run(reference.peer_command(
        python=_peer_python(), task=task.name, data_dir=data_dir, full=False, epochs=1,
        learning_rate=_config(task.name).learning_rate,  # ours, so that the dev scores compare too
        adapter_size=FLAGS.adapter_size, batch_size=FLAGS.batch_size, max_seq_length=FLAGS.seq_length,
        pad="longest",
    ))


def _print_epochs() -> None:
    print(f"\nreal data: one epoch of adapters (size {FLAGS.adapter_size}) at batch {FLAGS.batch_size}, at most "
          f"{FLAGS.seq_length} tokens, then dev; compilation included")
    print(f"{'task':5s} {'system':24s} {'examples':>8s} {'train s':>8s} {'dev s':>6s} {'total s':>8s} {'padded':>7s} "
          f"{'shapes':>6s} {'peak RSS':>9s}  dev")
    for task_name in FLAGS.epoch_tasks:
        task = tasks.get_task(task_name)
        rows = [_run_self(f"--epoch={task_name}:{layout}") for layout in FLAGS.epoch_layouts]
        for row in rows:
            print(f"{task.name:5s} {'adapter-jax ' + row['layout']:24s} {row['train_examples']:8d} {row['train_s']:8.1f} "
                  f"{row['eval_s']:6.1f} {row['train_s'] + row['eval_s']:8.1f} {row['padded_fraction']:7.1%} "
                  f"{row['train_shapes']:6d} {row['peak_rss_mib']:6.0f} MiB  {row['dev']}")
        if not _peer_python():
            continue
        with tempfile.TemporaryDirectory() as scratch:
            theirs = _run_peer_epoch(task, pathlib.Path(scratch))
        total = theirs["train_s"] + theirs["eval_s"]
        print(f"{task.name:5s} {'AdapterHub dynamic pad':24s} {theirs['train_examples']:8d} {theirs['train_s']:8.1f} "
              f"{theirs['eval_s']:6.1f} {total:8.1f} {'':>7s} {'':>6s} {theirs['peak_rss_mib']:6.0f} MiB  {theirs['dev']}")
        for row in rows:
            print(f"{task.name:5s} ours {row['layout']} / AdapterHub, epoch with dev: "
                  f"{total / (row['train_s'] + row['eval_s']):.2f}x faster")


def _device_step(model_name: str, dtype: str, batch_size: int) -> benchmarking.FixedShapeStep:
    return benchmarking.random_weights_step(benchmarking.SHAPED_MODELS[model_name], dtype=dtype, batch_size=batch_size,
                                            seq_length=FLAGS.seq_length, adapter_size=FLAGS.adapter_size)


def _largest_batch(model_name: str, dtype: str, memory_limit: int) -> int:
    """The largest power of two (at most --max_batch) whose compiled step fits in 90% of `memory_limit` bytes:
    extrapolated linearly from the steps at 32 and 64, then halved until XLA's memory analysis agrees."""
    peak = {b: benchmarking.step_memory(_device_step(model_name, dtype, b).compiled)["peak_bytes"] for b in (32, 64)}
    per_example = max((peak[64] - peak[32]) / 32, 1.0)
    fitting = (0.9 * memory_limit - peak[32]) / per_example + 32
    batch = 32
    while batch * 2 <= min(fitting, FLAGS.max_batch):
        batch *= 2
    while batch > 32 and benchmarking.step_memory(
            _device_step(model_name, dtype, batch).compiled)["peak_bytes"] > 0.9 * memory_limit:
        batch //= 2
    return batch


def measure_device_row(model_name: str, dtype: str, batch_size: int, peak_tflops: float) -> dict:
    """One accelerator-table row: `FLAGS.steps` timed steps after a warm-up one."""
    import jax

    step = _device_step(model_name, dtype, batch_size)
    p_state, metrics = step.compiled(step.p_state, step.p_frozen, step.batches[0])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        p_state, metrics = step.compiled(p_state, step.p_frozen, step.batches[0])
    jax.block_until_ready((p_state, metrics))
    step_s = (time.perf_counter() - start) / FLAGS.steps
    devices = jax.local_device_count()
    tflops = step.matmul_flops() * devices / step_s / 1e12
    return {"model": model_name, "dtype": dtype, "batch": batch_size, "seq_length": FLAGS.seq_length,
            "adapter_size": FLAGS.adapter_size, "examples_per_s": batch_size / step_s, "step_ms": step_s * 1e3,
            "matmul_tflops": tflops, "mfu": tflops / (peak_tflops * devices),
            "xla_peak_gib": benchmarking.step_memory(step.compiled)["peak_bytes"] / 2**30,
            "trainable_params": step.parameter_summary["trainable_params"], "devices": devices,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def _device_table() -> None:
    import jax

    device = jax.devices()[0]
    known = device_peaks.lookup(device.device_kind)
    if FLAGS.peak_tflops is None and known is None:
        raise app.UsageError(f"no peak listed for {device.device_kind!r} in adapter_jax/device_peaks.py: "
                             "pass --peak_tflops")
    peak = device_peaks.Peak(FLAGS.peak_tflops, FLAGS.peak_tflops) if FLAGS.peak_tflops else known
    memory_limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    print(f"device: {jax.local_device_count()} x {device.device_kind}, JAX {jax.__version__}, dense peak per chip "
          f"{peak.bfloat16:g} TFLOP/s bfloat16, {peak.float32:g} float32 (JAX's default precision), "
          f"memory {memory_limit / 2**30:.0f} GiB; batch x {FLAGS.seq_length} tokens, adapters of size "
          f"{FLAGS.adapter_size}, random weights, {FLAGS.steps} timed steps")
    print(f"{'model':15s} {'dtype':8s} {'batch':>5s} {'ex/s':>8s} {'ms/step':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'XLA peak':>9s}")
    for model_name, dtype in itertools.product(FLAGS.models, ("float32", "bfloat16")):
        for size in FLAGS.device_batches:
            batch = _largest_batch(model_name, dtype, memory_limit) if size == "max" else int(size)
            row = measure_device_row(model_name, dtype, batch, peak.for_dtype(dtype))
            print(f"{model_name:15s} {dtype:8s} {batch:5d} {row['examples_per_s']:8.0f} {row['step_ms']:8.1f} "
                  f"{row['matmul_tflops']:8.1f} {row['mfu']:6.1%} {row['xla_peak_gib']:6.2f} GiB", flush=True)
            if FLAGS.results_file:
                with open(FLAGS.results_file, "a") as results:
                    results.write(json.dumps(row) + "\n")


def main(argv: list[str]) -> None:
    del argv
    import jax

    if jax.default_backend() != "cpu" and not (FLAGS.only or FLAGS.epoch):
        _device_table()
        return
    if FLAGS.only == "matmul":
        print(json.dumps({"gflops": measure_matmul()}))
        return
    if FLAGS.only:
        print(json.dumps(measure(FLAGS.only)))
        return
    if FLAGS.epoch:
        task_name, layout = FLAGS.epoch.split(":")
        print(json.dumps(measure_epoch(task_name, packing=layout == "packed")))
        return
    print(f"CPU: {benchmarking.cpu_description()}")
    peaks = _measure_peaks()
    _print_peaks("first", peaks)
    if FLAGS.steps:
        ours, theirs = _measure_steps()
        # A shared VM's speed drifts; the peak is the best of a measurement before and one after the steps.
        after = _measure_peaks()
        _print_peaks("after the steps", after)
        peak = max(*peaks.values(), *after.values())
        print(f"peak = {peak:.0f} GFLOP/s")
        _print_steps(ours, theirs, peak)
    if FLAGS.epoch_tasks:
        _print_epochs()


if __name__ == "__main__":
    app.run(main)
