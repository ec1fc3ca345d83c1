"""Training: what trains, what crosses devices, pmap equivalence, resume, and a real end-to-end run."""

import functools
import json
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import jax_utils, traverse_util

from adapter_jax import checkpoint, input_pipeline, optim, train


def _setup_and_steps(config, num_devices: int):
    """The model, a fresh TrainState, and a pmapped train step over the first `num_devices` devices."""
    setup = train.build(config)
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    dataset = train.load_dataset(config, setup.task, "train", tokenizer)
    iterator = input_pipeline.TrainIterator(
        dataset, global_batch_size=config.global_batch_size, num_devices=num_devices, seed=0,
        buckets=tuple(config.buckets), process_index=0, process_count=1,
    )
    tx = optim.create_optimizer(setup.labels, learning_rate=config.learning_rate, total_steps=100)
    state = train.initial_state(setup.params, tx, seed=0)
    p_step = train.pmapped_train_step(setup, tx, devices=jax.local_devices()[:num_devices])
    return setup, state, iterator, p_step


def _run_steps(state, iterator, p_step, num_devices, steps):
    p_state = jax_utils.replicate(state, devices=jax.local_devices()[:num_devices])
    for _ in range(steps):
        p_state, _ = p_step(p_state, next(iterator))
    return jax.tree.map(lambda x: np.asarray(x)[0], p_state)  # first device's copy


def test_adapters_mode_freezes_everything_else(tiny_config):
    setup, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=2)
    final = _run_steps(state, iterator, p_step, 2, steps=3)
    flat_before = traverse_util.flatten_dict(jax.device_get(setup.params))
    flat_after = traverse_util.flatten_dict(final.params)
    flat_labels = traverse_util.flatten_dict(setup.labels)
    trainable_paths = [p for p, label in flat_labels.items() if label == optim.TRAINABLE]
    assert any("adapter" in p for p in trainable_paths) and any("LayerNorm" in p for p in trainable_paths)
    assert not any("pooler" in p or "query" in p or "word_embeddings" in p for p in trainable_paths)
    for path, before in flat_before.items():
        after = flat_after[path]
        if flat_labels[path] == optim.FROZEN:
            assert np.array_equal(before, after) and before.tobytes() == after.tobytes(), path
        else:
            assert not np.array_equal(before, after), f"trainable {path} did not change"
    # Adam's moments exist for trainable leaves only: every state array is trainable-sized or a scalar.
    trainable_sizes = sorted(flat_before[p].size for p in trainable_paths)
    moment_sizes = sorted(x.size for x in jax.tree.leaves(final.opt_state) if x.size > 1)
    assert moment_sizes == sorted(trainable_sizes * 2)


def _all_reduce_bytes(hlo_text: str) -> int:
    """Bytes all-reduced by a compiled HLO module, from the result shapes of its all-reduce ops."""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "f64": 8, "s64": 8}
    total = 0
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if not match:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            total += sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


@pytest.mark.parametrize("mode", ["adapters", "full"])
def test_compiled_step_all_reduces_only_trainable_gradients(tiny_config, mode):
    tiny_config.mode = mode
    setup, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=2)
    p_state = jax_utils.replicate(state, devices=jax.local_devices()[:2])
    hlo = p_step.lower(p_state, next(iterator)).compile().as_text()
    trainable_bytes = sum(
        leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(optim.partition(setup.params, setup.labels)[0])
    )
    reduced = _all_reduce_bytes(hlo)
    scalars = 64  # the loss, and little else
    assert reduced > 0
    if mode == "adapters":
        assert reduced <= trainable_bytes + scalars, (reduced, trainable_bytes)
        total_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(setup.params))
        assert reduced < total_bytes / 10
    else:  # the same check fails for full fine-tuning, whose trainable set is everything
        adapters_labels = optim.trainable_labels(setup.params, mode="adapters", num_layers=2)
        adapter_bytes = sum(
            leaf.size * leaf.dtype.itemsize
            for leaf in jax.tree.leaves(optim.partition(setup.params, adapters_labels)[0])
        )
        assert reduced > adapter_bytes + scalars


def test_one_and_two_devices_give_the_same_parameters(tiny_config):
    tiny_config.dropout_rate = 0.0  # per-device dropout keys differ by design; the maths must not
    results = []
    for num_devices in (1, 2):
        _, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices)
        results.append(_run_steps(state, iterator, p_step, num_devices, steps=4).params)
    for one, two in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)


def _final_checkpoint_params(workdir) -> dict:
    manager = checkpoint.checkpoint_manager(workdir / "checkpoints")
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]


def test_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path):
    tiny_config.num_epochs = 3  # 24 steps: checkpoints at 4, 8 (epoch), 12, 16 (epoch), 20, 24 (epoch)
    tiny_config.checkpoints_to_keep = 10
    uninterrupted = train.train_and_evaluate(tiny_config, tmp_path / "a")

    interrupted_dir = tmp_path / "b"
    train.train_and_evaluate(tiny_config, interrupted_dir)
    # A crash right after the step-12 checkpoint leaves the checkpoints up to 12 behind.
    for step_dir in (interrupted_dir / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 12:
            shutil.rmtree(step_dir)
    (interrupted_dir / "summary.json").unlink()
    resumed = train.train_and_evaluate(tiny_config, interrupted_dir)

    assert resumed["final_dev_metrics"] == uninterrupted["final_dev_metrics"]
    assert resumed["dev_metrics"] == uninterrupted["dev_metrics"]
    a, b = _final_checkpoint_params(tmp_path / "a"), _final_checkpoint_params(interrupted_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_predict_writes_submission_from_export(tiny_config, tmp_path):
    summary = train.train_and_evaluate(tiny_config, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["score"] == summary["score"]
    result = train.predict(tiny_config, tmp_path)
    assert result["dev_metrics"]["dev"] == summary["all_dev_metrics"]["dev"]
    (path,) = result["submission_files"]
    rows = open(path).read().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 1 + 20
    assert {r.split("\t")[1] for r in rows[1:]} <= {"entailment", "not_entailment"}


def test_export_refuses_another_base_model(tiny_config, tmp_path, minilm_dir):
    train.train_and_evaluate(tiny_config, tmp_path)
    tiny_config.model = str(minilm_dir)
    with pytest.raises(Exception, match="trained on base model"):
        train.load_export_onto_base(tiny_config, tmp_path / "export")


def test_real_minilm_rte_end_to_end(glue_dir, minilm_dir, tmp_path):
    """A short adapter run on the real checkpoint and real RTE data."""
    from configs import glue

    config = glue.get_config("rte")
    config.model = str(minilm_dir)
    config.glue_dir = str(glue_dir)
    config.max_train_examples = 64
    config.global_batch_size = 8
    config.eval_batch_size = 32
    config.num_epochs = 3  # 24 steps over the same 64 examples: the training loss must fall
    config.learning_rate = 3e-3
    config.log_every_steps = 1
    summary = train.train_and_evaluate(config, tmp_path)

    losses = [json.loads(line)["train/loss"] for line in open(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.02, losses
    assert 0.0 <= summary["dev_metrics"]["accuracy"] <= 1.0
    assert summary["trainable_fraction"] < 0.05

    export = tmp_path / "export" / checkpoint.EXPORT_FILE
    full_bytes = 4 * summary["total_params"]
    assert export.stat().st_size < 0.05 * full_bytes

    setup, _ = train.load_export_onto_base(config, tmp_path / "export")
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    dev = {"dev": train.load_dataset(config, setup.task, "dev", tokenizer)}
    p_eval = jax.pmap(functools.partial(train.eval_step, model=setup.model), axis_name=train.AXIS)
    results = train.evaluate(p_eval, train.replicate(setup.params), dev, setup.task, config)
    assert results == summary["all_dev_metrics"]


def test_compiled_step_skips_weight_gradients_of_frozen_layers(tiny_config):
    """XLA's own FLOP count: the adapters step does the forward and activation gradients, not the
    frozen weights' gradients, so it costs clearly less than a full fine-tuning step."""
    flops = {}
    for mode in ("adapters", "full"):
        tiny_config.mode = mode
        _, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=2)
        p_state = jax_utils.replicate(state, devices=jax.local_devices()[:2])
        analysis = p_step.lower(p_state, next(iterator)).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        flops[mode] = analysis["flops"]
    assert flops["adapters"] < 0.8 * flops["full"], flops


def test_replicated_state_is_laid_out_like_the_steps_outputs(tiny_config):
    """Otherwise JAX compiles the whole training step a second time on step 2."""
    _, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=jax.local_device_count())
    p_state = train.replicate(state)
    before = [leaf.sharding for leaf in jax.tree.leaves(p_state)]
    p_state, _ = p_step(p_state, next(iterator))
    assert [leaf.sharding for leaf in jax.tree.leaves(p_state)] == before


def test_predict_needs_no_train_file(tiny_config, tmp_path):
    train.train_and_evaluate(tiny_config, tmp_path / "run")
    glue = tmp_path / "glue_without_train"
    shutil.copytree(tiny_config.glue_dir, glue)
    (glue / "RTE" / "train.tsv").unlink()
    tiny_config.glue_dir = str(glue)
    assert train.predict(tiny_config, tmp_path / "run")["submission_files"]
    (glue / "RTE" / "test.tsv").unlink()
    with pytest.raises(Exception, match=r"test\.tsv not found"):
        train.predict(tiny_config, tmp_path / "run")
