"""scripts.ablate: removing adapters is exact and local, one compilation serves every span, and the script's files."""

import collections
import csv
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapter_jax import (
    evaluation,
    export,
    input_pipeline,
    modeling,
    steps,
    tasks,
)
from adapter_jax import experiment as experiment_lib
from adapter_jax.adapters import SITES, AdapterConfig
from adapter_jax.errors import CheckpointError, ConfigError
from adapter_jax.workdir import Workdir
from scripts import ablate

# Adapters drawn this wide change every layer's output clearly, so that removing one shows.
WIDE_INIT_STD = 0.3


def _ablator(config) -> tuple[ablate.Ablator, experiment_lib.Experiment, input_pipeline.TokenizedDataset]:
    config.adapter_init_std = WIDE_INIT_STD
    experiment = experiment_lib.build(config)
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    dataset = experiment_lib.load_dataset(config, experiment.task, "dev", tokenizer)
    return ablate.Ablator(experiment, config, dataset), experiment, dataset


def _logits(experiment: experiment_lib.Experiment, config, dataset, trainable_params) -> np.ndarray:
    """The model's logits through the same Evaluator the trainer uses."""
    evaluator = evaluation.Evaluator(experiment, config)
    return evaluator.logits(steps.replicate(trainable_params), steps.replicate(experiment.frozen_params), dataset)


def _four_layer_model() -> tuple[modeling.BertForSequenceClassification, dict, jax.Array]:
    config = modeling.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    model = modeling.BertForSequenceClassification(config, AdapterConfig(size=4, init_std=WIDE_INIT_STD))
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 8), 0, 50)
    params = model.init(jax.random.PRNGKey(0), ids, jnp.zeros_like(ids), jnp.ones_like(ids))["params"]
    return model, params, ids


def test_spans_are_every_contiguous_span_once():
    assert ablate.spans(0) == []
    for num_layers in range(1, 6):
        found = ablate.spans(num_layers)
        assert len(found) == len(set(found)) == num_layers * (num_layers + 1) // 2
        assert set(found) == {(i, j) for i in range(num_layers) for j in range(num_layers) if i <= j}


def test_remove_adapters_zeroes_only_the_up_projections_of_those_layers():
    _, params, _ = _four_layer_model()
    removed = ablate.remove_adapters(params, {1, 2})
    zeroed = {
        f"bert/encoder/layer_{layer}/{site}/adapter/up/{name}"
        for layer in (1, 2)
        for site in ("attention/output", "output")
        for name in ("kernel", "bias")
    }
    assert len(SITES) == 2  # the two sites named above
    before = {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(params).items()}
    after = {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(removed).items()}
    assert before.keys() == after.keys()
    assert zeroed <= before.keys()
    for path, leaf in after.items():
        if path in zeroed:
            assert not np.any(leaf) and np.shape(leaf) == np.shape(before[path]), path
        else:
            np.testing.assert_array_equal(leaf, before[path], err_msg=path)
    assert ablate.adapter_layer("bert/encoder/layer_11/output/adapter/up/kernel") == 11
    assert ablate.adapter_layer("bert/encoder/layer_11/output/adapter/down/kernel") is None


def test_a_span_removal_changes_only_the_layers_from_its_first():
    model, params, ids = _four_layer_model()

    def layer_outputs(p) -> list[np.ndarray]:
        _, state = model.apply(
            {"params": p}, ids, jnp.zeros_like(ids), jnp.ones_like(ids),
            capture_intermediates=lambda module, _: isinstance(module, modeling.BertLayer),
        )
        encoder = state["intermediates"]["bert"]["encoder"]
        return [np.asarray(encoder[f"layer_{i}"]["__call__"][0]) for i in range(4)]

    unablated = layer_outputs(params)
    for first, last in ablate.spans(4):
        ablated = layer_outputs(ablate.remove_adapters(params, range(first, last + 1)))
        for layer in range(4):
            if layer < first:
                np.testing.assert_array_equal(ablated[layer], unablated[layer], err_msg=f"span {first}..{last}")
            else:
                assert np.abs(ablated[layer] - unablated[layer]).max() > 1e-3, (first, last, layer)


def _without_adapters(params) -> dict:
    return traverse_util.unflatten_dict(
        {path: leaf for path, leaf in traverse_util.flatten_dict(params).items() if "adapter" not in path}
    )


def _base_model(model: modeling.BertForSequenceClassification) -> modeling.BertForSequenceClassification:
    return dataclasses.replace(model, adapter=AdapterConfig(size=0), parent=None, name=None)


def test_removing_every_adapter_gives_exactly_the_base_model():
    """Op by op (no XLA fusion to reorder the arithmetic), bit for bit: x + 0 is x."""
    model, params, ids = _four_layer_model()
    inputs = (ids, jnp.zeros_like(ids), jnp.ones_like(ids))
    base_logits = _base_model(model).apply({"params": _without_adapters(params)}, *inputs)
    ablated = model.apply({"params": ablate.remove_adapters(params, range(4))}, *inputs)
    np.testing.assert_array_equal(ablated, base_logits)
    assert not np.allclose(model.apply({"params": params}, *inputs), base_logits, rtol=1e-3)


def test_the_ablator_without_any_adapter_scores_the_base_model(tiny_config):
    """Through the compiled evaluation, within float32 rounding: XLA fuses the program with zeroed adapters and
    the one without adapters differently (the last bits of the logits differ, ~1e-7 relative)."""
    ablator, experiment, dataset = _ablator(tiny_config)
    base = dataclasses.replace(experiment, model=_base_model(experiment.model))
    base_logits = _logits(base, tiny_config, dataset, _without_adapters(experiment.trainable_params))
    np.testing.assert_allclose(ablator.logits(range(ablator.num_layers)), base_logits, rtol=1e-5)
    assert not np.allclose(ablator.logits(), base_logits, rtol=1e-3)  # the adapters did matter


def test_removing_no_adapter_gives_the_trained_model(tiny_config):
    ablator, experiment, dataset = _ablator(tiny_config)
    trained_logits = _logits(experiment, tiny_config, dataset, experiment.trainable_params)
    np.testing.assert_array_equal(ablator.logits(()), trained_logits)
    assert not np.allclose(ablator.logits([0]), trained_logits, rtol=1e-3)


def test_the_ablation_compiles_once_for_all_spans(tiny_config):
    ablator, _, _ = _ablator(tiny_config)
    with ablate.CompileCounter() as first:
        ablator.metrics()
    assert first.count > 0  # the counter sees compilations: the dev set's bucket shapes
    with ablate.CompileCounter() as rest:
        for span_first, span_last in ablate.spans(ablator.num_layers):
            ablator.metrics(range(span_first, span_last + 1))
    assert rest.count == 0
    with ablate.CompileCounter() as other:  # and it counts every compilation, whatever compiles
        jax.jit(lambda x: x + 1)(np.zeros(7, np.float32))
    assert other.count == 1


def test_majority_score():
    rte, cola, stsb = tasks.get_task("rte"), tasks.get_task("cola"), tasks.get_task("stsb")
    labels = np.array([1, 0, 1, 1, 0, 1, 1], np.int32)
    assert ablate.majority_score(rte, labels) == pytest.approx(np.mean(labels == 1))
    assert ablate.majority_score(rte, 1 - labels) == pytest.approx(np.mean(labels == 1))
    assert ablate.majority_score(cola, labels) == 0.0  # a constant prediction has no correlation
    assert ablate.majority_score(stsb, np.array([0.5, 3.0, 4.5], np.float32)) == 0.0


def _dev_majority_fraction(glue_dir) -> float:
    with open(glue_dir / "RTE" / "dev.tsv", newline="") as f:
        labels = [row["label"] for row in csv.DictReader(f, delimiter="\t")]
    return collections.Counter(labels).most_common(1)[0][1] / len(labels)


def test_main_ablates_a_trained_run(tmp_path, tiny_model_dir, tiny_glue_dir, trained_run):
    workdir, summary = trained_run.workdir, trained_run.summary  # read only: the ablation goes to out_dir
    out_dir = tmp_path / "ablation"
    dev_only = tmp_path / "glue-dev-only"  # an ablation reads dev alone: no train or test file is needed
    (dev_only / "RTE").mkdir(parents=True)
    shutil.copy(tiny_glue_dir / "RTE" / "dev.tsv", dev_only / "RTE" / "dev.tsv")
    results = ablate.main([
        f"--workdir={workdir}", f"--out_dir={out_dir}", f"--config.model={tiny_model_dir}",
        f"--config.glue_dir={dev_only}", "--config.buckets=(16, 32)", "--config.eval_batch_size=8",
    ])
    assert json.loads((out_dir / ablate.RESULTS_FILE).read_text()) == results
    num_layers = 2
    assert results["num_layers"] == num_layers and results["task"] == "rte" and results["metric"] == "accuracy"
    assert [(s["first"], s["last"]) for s in results["spans"]] == ablate.spans(num_layers)
    assert len(results["spans"]) == num_layers * (num_layers + 1) // 2
    assert results["unablated"] == summary["score"]  # nothing removed: the exported best-on-dev model's own score
    assert results["majority"] == pytest.approx(_dev_majority_fraction(tiny_glue_dir))
    assert results["compilations"]["unablated"] > 0 and results["compilations"]["spans"] == 0
    assert (out_dir / ablate.PLOT_FILE).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # The heatmap's cells, read back from the figure: row = last ablated layer, column = first.
    figure = ablate.plot(results, tmp_path / "again.png")
    cells = np.ma.filled(figure.axes[0].images[0].get_array().astype(float), np.nan)
    assert cells.shape == (num_layers, num_layers)
    for span in results["spans"]:
        assert cells[span["last"], span["first"]] == pytest.approx(100 * span["score"])
    assert np.isnan(cells[0, 1])  # first > last: no such span
    caption = " ".join(text.get_text() for text in figure.texts)
    assert f"Unablated: {100 * results['unablated']:.1f}" in caption
    assert f"Majority class: {100 * results['majority']:.1f}" in caption

    # The committed figures are redrawn from their JSON alone.
    (out_dir / ablate.PLOT_FILE).unlink()
    assert ablate.main([f"--replot={out_dir / ablate.RESULTS_FILE}"]) == results
    assert (out_dir / ablate.PLOT_FILE).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_ablate_checks_the_config_and_names_a_missing_dev_file(tiny_config, tmp_path):
    experiment = experiment_lib.build(tiny_config)
    export.write(Workdir(tmp_path).export_dir, experiment.trainable_params, export.metadata(experiment))
    tiny_config.glue_dir = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"RTE[/\\]dev\.tsv not found \(task rte, split dev\)"):
        ablate.ablate(tiny_config, tmp_path)


def test_ablate_refuses_an_export_without_adapters(tiny_config, tmp_path):
    tiny_config.mode = "layernorm"
    experiment = experiment_lib.build(tiny_config)
    export.write(Workdir(tmp_path).export_dir, experiment.trainable_params, export.metadata(experiment))
    with pytest.raises(CheckpointError, match="'layernorm' run, which has no adapters"):
        ablate.ablate(tiny_config, tmp_path)


def test_command_line(capsys):
    config = ablate.parse_config(["--config.eval_batch_size=4"])
    assert config.eval_batch_size == 4 and config.task == "rte"  # configs/glue.py by default
    assert ablate.parse_config([f"--config={ablate.DEFAULT_CONFIG}:cola"]).task == "cola"
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--workdir=/nonexistent", "--config.eval_batch_sise=4"])
    assert exit_info.value.code == 2 and "eval_batch_sise" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(["--help"])
    assert exit_info.value.code == 0 and ablate.__doc__.splitlines()[0] in capsys.readouterr().out

