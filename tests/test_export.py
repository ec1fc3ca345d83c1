"""export and run_spec: the run an export carries, read back whole, and exports of earlier versions."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from adapter_jax import bank as bank_lib
from adapter_jax import experiment as experiment_lib
from adapter_jax import export, glue_data, input_pipeline
from adapter_jax.adapters import AdapterConfig
from adapter_jax.run_spec import RunSpec

# Written by the code of commit 488baf7 (export metadata format 1) on MiniLM: adapters of size 2 in layers 4-5,
# every trained parameter moved off its initial value, and that model's logits on two RTE pairs.
FORMAT_1 = pathlib.Path(__file__).parent / "data" / "export_format1"


def _format_1_metadata(config, experiment) -> dict:
    """export.metadata as commit 488baf7 wrote it, key by key."""
    return {
        "format": 1,
        "task": experiment.task.name,
        "model": config.model,
        "base_fingerprint": experiment.base_fingerprint,
        "bert_config": dataclasses.asdict(experiment.bert_config),
        "adapter": {
            "size": config.adapter_size if config.mode == "adapters" else 0,
            "init_std": config.adapter_init_std,
            "sites": tuple(config.adapter_sites),
            "layers": tuple(config.adapter_layers) or None,
        },
        "mode": config.mode,
        "top_k": config.top_k,
        "train_pooler": config.train_pooler,
        "num_labels": experiment.task.num_labels,
        "max_seq_length": config.max_seq_length,
    }


@pytest.mark.parametrize("mode", ["adapters", "layernorm", "top_k"])
def test_metadata_keeps_format_1(tiny_config, mode):
    tiny_config.mode, tiny_config.top_k, tiny_config.adapter_layers = mode, 1, (1,)
    experiment = experiment_lib.build(tiny_config)
    assert export.metadata(experiment) == _format_1_metadata(tiny_config, experiment)


def test_spec_is_decided_once_and_read_back_whole(tiny_config, tmp_path):
    tiny_config.mode = "layernorm"  # the config's adapter_size (64) is not the run's: it has no adapters
    spec = RunSpec.from_config(tiny_config)
    assert spec.adapter == AdapterConfig(size=0, init_std=tiny_config.adapter_init_std)
    experiment = experiment_lib.build(tiny_config)
    assert experiment.spec == spec
    export.write(tmp_path, experiment.trainable_params, export.metadata(experiment))
    exported = export.read(tmp_path)
    assert exported.spec == spec and exported.base_fingerprint == experiment.base_fingerprint
    assert exported.source == tmp_path / export.EXPORT_FILE


def test_load_builds_the_exports_run_not_the_configs(tiny_config, tmp_path):
    tiny_config.adapter_size, tiny_config.adapter_layers, tiny_config.max_seq_length = 4, (1,), 16
    trained = experiment_lib.build(tiny_config)
    export.write(tmp_path, trained.trainable_params, export.metadata(trained))
    # The config's own model keys are not the loaded run's, nor checked: size 64 would not fit hidden size 32.
    tiny_config.adapter_size, tiny_config.adapter_layers, tiny_config.max_seq_length = 64, (), 32
    loaded, data_config = export.load(tiny_config, tmp_path, purpose="evaluate")
    assert loaded.spec == trained.spec
    assert data_config.max_seq_length == 16 and data_config.adapter_size == 64  # the data's, and unread


def _logits(experiment, examples) -> np.ndarray:
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    data = input_pipeline.tokenize(experiment.task, examples, tokenizer, experiment.spec.max_seq_length)
    mask = (np.arange(data.max_seq_length) < data.lengths[:, None]).astype(np.int32)
    return np.asarray(experiment.model.apply({"params": experiment.params}, data.input_ids, data.token_type_ids, mask))


@pytest.mark.slow  # the real MiniLM
def test_an_export_of_format_1_predicts_as_it_did(glue_dir, minilm_dir):
    from configs import glue

    expected = json.loads((FORMAT_1 / "logits.json").read_text())
    examples = [glue_data.Example(i, a, b, None) for i, (a, b) in enumerate(expected["examples"])]
    config = glue.get_config("rte")
    config.model, config.glue_dir = str(minilm_dir), str(glue_dir)
    experiment, _ = export.load(config, FORMAT_1, purpose="evaluate")
    assert experiment.spec.adapter == AdapterConfig(size=2, layers=(4, 5))
    np.testing.assert_allclose(_logits(experiment, examples), expected["logits"], atol=1e-5, rtol=0)

    bank = bank_lib.AdapterBank.holding({"rte": export.read(FORMAT_1)}, str(minilm_dir), batch_sizes=(2,))
    (mixed,) = bank.logits([("rte", bank.tokenize("rte", examples))])
    np.testing.assert_allclose(mixed, expected["logits"], atol=1e-5, rtol=0)
