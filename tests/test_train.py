"""Training: what trains, what crosses devices, pmap equivalence, resume, and a real end-to-end run."""

import dataclasses
import functools
import inspect
import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import jax_utils, traverse_util

from adapter_jax import (
    checkpoint,
    errors,
    evaluation,
    experiment,
    export,
    glue_data,
    history,
    input_pipeline,
    optim,
    predict,
    steps,
    train,
    trainable,
    training_setup,
    validation,
)
from adapter_jax.workdir import Workdir


def _setup_and_steps(config, num_devices: int):
    """The experiment, a fresh TrainState, and a pmapped train step over the first `num_devices` devices."""
    setup = experiment.build(config)
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    dataset = experiment.load_dataset(config, setup.task, "train", tokenizer)
    layout = input_pipeline.Layout(
        global_batch_size=config.global_batch_size, eval_batch_size=config.eval_batch_size, num_devices=num_devices,
        max_seq_length=config.max_seq_length, buckets=tuple(config.buckets), process_index=0, process_count=1,
    )
    iterator = input_pipeline.TrainIterator(dataset, layout, seed=0)
    tx = optim.create_optimizer(learning_rate=config.learning_rate, total_steps=100)
    state = steps.initial_state(setup.trainable_params, tx, seed=0)
    p_step = steps.pmapped_train_step(
        setup.model, tx, setup.task.is_regression, devices=jax.local_devices()[:num_devices]
    )
    return setup, state, iterator, p_step


def _replicated(setup, state, num_devices):
    """(state, frozen parameters) copied to the first `num_devices` devices."""
    devices = jax.local_devices()[:num_devices]
    return jax_utils.replicate(state, devices=devices), jax_utils.replicate(setup.frozen_params, devices=devices)


def _run_steps(setup, state, iterator, p_step, num_devices, num_steps):
    """The full parameters and the state after `num_steps` steps (first device's copy)."""
    p_state, p_frozen = _replicated(setup, state, num_devices)
    for _ in range(num_steps):
        p_state, _ = p_step(p_state, p_frozen, next(iterator))
    state = jax.tree.map(lambda x: np.asarray(x)[0], p_state)
    return trainable.merge(state.params, setup.frozen_params), state


def test_adapters_mode_freezes_everything_else(tiny_config):
    setup, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=2)
    params_after, final = _run_steps(setup, state, iterator, p_step, 2, num_steps=3)
    flat_before = traverse_util.flatten_dict(jax.device_get(setup.params))
    flat_after = traverse_util.flatten_dict(params_after)
    flat_mask = traverse_util.flatten_dict(setup.trainable_mask)
    trainable_paths = [p for p, trains in flat_mask.items() if trains]
    assert any("adapter" in p for p in trainable_paths) and any("LayerNorm" in p for p in trainable_paths)
    assert not any("pooler" in p or "query" in p or "word_embeddings" in p for p in trainable_paths)
    for path, before in flat_before.items():
        after = flat_after[path]
        if not flat_mask[path]:
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
    hlo = p_step.lower(*_replicated(setup, state, 2), next(iterator)).compile().as_text()
    trainable_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(setup.trainable_params))
    reduced = _all_reduce_bytes(hlo)
    scalars = 64  # the loss, and little else
    assert reduced > 0
    if mode == "adapters":
        assert reduced <= trainable_bytes + scalars, (reduced, trainable_bytes)
        total_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(setup.params))
        assert reduced < total_bytes / 10
    else:  # the same check fails for full fine-tuning, whose trainable set is everything
        adapters_mask = trainable.trainable_mask(setup.params, mode="adapters", num_layers=2)
        adapter_bytes = sum(
            leaf.size * leaf.dtype.itemsize
            for leaf in jax.tree.leaves(trainable.split(setup.params, adapters_mask)[0])
        )
        assert reduced > adapter_bytes + scalars


def test_one_and_two_devices_give_the_same_parameters(tiny_config):
    tiny_config.dropout_rate = 0.0  # per-device dropout keys differ by design; the maths must not
    results = []
    for num_devices in (1, 2):
        setup, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices)
        results.append(_run_steps(setup, state, iterator, p_step, num_devices, num_steps=4)[0])
    for one, two in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6)


def test_packed_step_gives_the_unpacked_loss_and_gradients(tiny_config):
    """The same 32 examples of mixed lengths, packed several to a row or one per row: the same loss and
    gradients (float32, no dropout) to within float32 summation order, on one device and under pmap on two."""
    tiny_config.dropout_rate = 0.0
    tiny_config.max_seq_length = 64
    tiny_config.global_batch_size = 32
    setup = experiment.build(tiny_config)
    examples = glue_data.read_examples(setup.task, "train", glue_dir=tiny_config.glue_dir)[:32]
    # Premises repeated 1-5 times: 15 to 47 tokens per example.
    mixed = [dataclasses.replace(e, text_a=" ".join([e.text_a] * (1 + i % 5))) for i, e in enumerate(examples)]
    dataset = input_pipeline.tokenize(setup.task, mixed, input_pipeline.load_tokenizer(setup.model_dir), 64)

    def first_batch(packing, num_devices):
        layout = input_pipeline.Layout(global_batch_size=32, eval_batch_size=32, num_devices=num_devices,
                                       max_seq_length=64, buckets=(64,), packing=packing, process_index=0,
                                       process_count=1)
        iterator = input_pipeline.TrainIterator(dataset, layout, seed=0)
        return next(iterator)

    unpacked, packed = first_batch(False, 1), first_batch(True, 1)
    np.testing.assert_array_equal(unpacked["idx"], packed["idx"])
    assert packed["input_ids"].shape[1] < 32  # several examples to a row
    loss_and_grads = jax.jit(jax.value_and_grad(
        functools.partial(steps.batch_loss, model=setup.model, is_regression=False)
    ))
    (loss, grads), (packed_loss, packed_grads) = (
        loss_and_grads(setup.trainable_params, setup.frozen_params, jax.tree.map(lambda x: x[0], batch),
                       jax.random.key(0))
        for batch in (unpacked, packed)
    )
    grad_scale = max(np.abs(leaf).max() for leaf in jax.tree.leaves(grads))
    grad_diff = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(packed_grads)))
    print(f"packed vs unpacked: loss {float(loss):.6f} vs {float(packed_loss):.6f}, "
          f"largest gradient difference {grad_diff:.2e} of largest gradient {grad_scale:.2e}")
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-6)
    assert jax.tree.structure(packed_grads) == jax.tree.structure(grads)
    assert grad_diff <= 1e-5 * grad_scale

    tx = optim.create_optimizer(learning_rate=tiny_config.learning_rate, total_steps=100)
    p_step = steps.pmapped_train_step(setup.model, tx, is_regression=False)
    state, p_frozen = steps.initial_state(setup.trainable_params, tx, seed=0), steps.replicate(setup.frozen_params)
    metrics = [  # a fresh copy of the state each time: the step donates it
        jax.device_get(p_step(steps.replicate(state), p_frozen, first_batch(packing, 2))[1]) for packing in (False, True)
    ]
    np.testing.assert_allclose(metrics[1]["loss"], metrics[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[1]["grad_norm"], metrics[0]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(metrics[0]["loss"], loss, rtol=1e-6)  # the pmean of two shards' means


def _final_checkpoint_params(workdir) -> dict:
    manager = checkpoint.checkpoint_manager(workdir)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]


@pytest.mark.slow  # a 24-step run and its resume
def test_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path):
    tiny_config.num_epochs = 3  # 24 steps: checkpoints at 4, 8 (epoch), 12, 16 (epoch), 20, 24 (epoch)
    tiny_config.checkpoints_to_keep = 10
    uninterrupted = train.train_and_evaluate(tiny_config, tmp_path / "a")

    interrupted_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a", interrupted_dir)  # the same run again, without training it twice
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


def test_training_setup_takes_steps_and_optimizer_settings_from_the_config(tiny_config):
    """What benchmark.py and profile_step.py time is what training runs: the optimizer of the config's keys."""
    tiny_config.num_train_steps = 10  # overrides num_epochs
    tiny_config.warmup_fraction = 0.0
    tiny_config.weight_decay = 0.0
    tiny_config.max_grad_norm = 1e-12  # Adam's epsilon then dwarfs every clipped gradient: updates ~ lr * 1e-6
    setup = training_setup.build(tiny_config)
    assert setup.total_steps == 10 and float(setup.schedule(0)) == pytest.approx(tiny_config.learning_rate)
    assert setup.experiment.frozen_params is None  # the devices hold the only copy
    p_state, _ = setup.p_train_step(steps.replicate(setup.initial_state), setup.p_frozen, next(setup.train_iter))
    moved = jax.tree.map(lambda new, old: np.abs(np.asarray(new)[0] - old).max(), p_state.params,
                         setup.initial_state.params)
    assert max(jax.tree.leaves(moved)) < 1e-6 * tiny_config.learning_rate * 10


def test_logged_learning_rate_is_the_one_each_step_used(tiny_config, tmp_path):
    """The update that made step s used schedule(s - 1): optax counts its updates from 0."""
    tiny_config.num_epochs = 1  # 8 steps, each logged
    train.train_and_evaluate(tiny_config, tmp_path)
    schedule = optim.learning_rate_schedule(tiny_config.learning_rate, 8, tiny_config.warmup_fraction)
    logged = {line["step"]: line["train/learning_rate"] for line in history.read_history(tmp_path)
              if "train/learning_rate" in line}
    assert logged == {step: pytest.approx(float(schedule(step - 1))) for step in range(1, 9)}


def test_predict_writes_submission_from_export(tiny_config, tmp_path, trained_run):
    trained_run.copy_to(tmp_path)
    summary = trained_run.summary
    assert json.loads((tmp_path / "summary.json").read_text())["score"] == summary["score"]
    result = predict.predict(tiny_config, tmp_path)
    assert result["dev_metrics"]["dev"] == summary["all_dev_metrics"]["dev"]
    (path,) = result["submission_files"]
    rows = pathlib.Path(path).read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 1 + 20
    assert {r.split("\t")[1] for r in rows[1:]} <= {"entailment", "not_entailment"}


def test_summary_records_the_epochs_that_ran(tiny_config, tmp_path):
    """num_train_steps overrides num_epochs: 12 steps of 8 per epoch are 1.5 epochs, not the config's 2."""
    tiny_config.num_train_steps = 12
    summary = train.train_and_evaluate(tiny_config, tmp_path)
    assert (summary["num_epochs"], summary["num_train_steps"]) == (1.5, 12)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_export_refuses_another_base_model(tiny_config, tmp_path, minilm_dir, trained_run):
    trained_run.copy_to(tmp_path)
    tiny_config.model = str(minilm_dir)
    with pytest.raises(Exception, match="trained on base model"):
        export.load(tiny_config, tmp_path / "export")


@pytest.mark.slow  # the real MiniLM trained on real RTE
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

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.02, losses
    assert 0.0 <= summary["dev_metrics"]["accuracy"] <= 1.0
    assert summary["trainable_fraction"] < 0.05

    export_file = Workdir(tmp_path).export_file
    full_bytes = 4 * summary["total_params"]
    assert os.path.getsize(export_file) < 0.05 * full_bytes

    setup, config = export.load(config, tmp_path / "export")
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    dev = {"dev": experiment.load_dataset(config, setup.task, "dev", tokenizer)}
    evaluator = evaluation.Evaluator(setup, config)
    results = evaluator.evaluate(
        steps.replicate(setup.trainable_params), steps.replicate(setup.frozen_params), dev, setup.task
    )
    assert results == summary["all_dev_metrics"]


def test_compiled_step_skips_weight_gradients_of_frozen_layers(tiny_config):
    """XLA's own FLOP count: the adapters step does the forward and activation gradients, not the
    frozen weights' gradients, so it costs clearly less than a full fine-tuning step."""
    flops = {}
    for mode in ("adapters", "full"):
        tiny_config.mode = mode
        setup, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=2)
        analysis = p_step.lower(*_replicated(setup, state, 2), next(iterator)).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        flops[mode] = analysis["flops"]
    assert flops["adapters"] < 0.8 * flops["full"], flops


def test_replicated_state_is_laid_out_like_the_steps_outputs(tiny_config):
    """Otherwise JAX compiles the whole training step a second time on step 2."""
    setup, state, iterator, p_step = _setup_and_steps(tiny_config, num_devices=jax.local_device_count())
    p_state = steps.replicate(state)
    before = [leaf.sharding for leaf in jax.tree.leaves(p_state)]
    p_state, _ = p_step(p_state, steps.replicate(setup.frozen_params), next(iterator))
    assert [leaf.sharding for leaf in jax.tree.leaves(p_state)] == before


def test_predict_needs_no_train_file(tiny_config, tmp_path, trained_run):
    trained_run.copy_to(tmp_path / "run")
    glue = tmp_path / "glue_without_train"
    shutil.copytree(tiny_config.glue_dir, glue)
    (glue / "RTE" / "train.tsv").unlink()
    tiny_config.glue_dir = str(glue)
    assert predict.predict(tiny_config, tmp_path / "run")["submission_files"]
    (glue / "RTE" / "test.tsv").unlink()
    with pytest.raises(Exception, match=r"test\.tsv not found"):
        predict.predict(tiny_config, tmp_path / "run")


def _recording_tokenize(monkeypatch) -> list[int]:
    """The max_seq_length of every tokenize call from now on."""
    lengths = []
    original = input_pipeline.tokenize

    def recording(*args, **kwargs):
        lengths.append(inspect.signature(original).bind(*args, **kwargs).arguments["max_seq_length"])
        return original(*args, **kwargs)

    monkeypatch.setattr(input_pipeline, "tokenize", recording)
    return lengths


def test_predict_checks_the_config_with_the_exports_settings_in_place(tiny_config, tmp_path, trained_run):
    trained_run.copy_to(tmp_path)
    tiny_config.adapter_size = 64  # above the tiny model's hidden size: refused for training, but the export says 8
    assert predict.predict(tiny_config, tmp_path)["submission_files"]


def test_predict_tokenizes_to_the_exports_sequence_length(tiny_config, tmp_path, monkeypatch, trained_run):
    trained_run.copy_to(tmp_path)
    tiny_config.max_seq_length = 16
    lengths = _recording_tokenize(monkeypatch)
    predict.predict(tiny_config, tmp_path)
    assert lengths and set(lengths) == {32}


def test_predicting_mnli_checks_the_ax_file_before_it_starts(tiny_config, tmp_path):
    """An MNLI model predicts AX too; a missing diagnostic.tsv is a config error up front, not a crash
    after the MNLI files are written."""
    header = "index\tsentence1\tsentence2\tgold_label\n"
    for name in ("dev_matched", "dev_mismatched", "test_matched", "test_mismatched"):
        path = tmp_path / "MNLI" / f"{name}.tsv"
        path.parent.mkdir(exist_ok=True)
        path.write_text(header + "0\ta cat\ta dog\tneutral\n")
    tiny_config.task = "mnli"
    tiny_config.glue_dir = str(tmp_path)
    with pytest.raises(errors.ConfigError, match=r"diagnostic[/\\]diagnostic\.tsv not found \(task ax, split test\)"):
        validation.validate_config(tiny_config, purpose="predict")
    (tmp_path / "diagnostic").mkdir()
    (tmp_path / "diagnostic" / "diagnostic.tsv").write_text("index\tsentence1\tsentence2\n0\ta cat\ta dog\n")
    validation.validate_config(tiny_config, purpose="predict")
