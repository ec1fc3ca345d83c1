"""AdapterHub export and import (adapterhub.py, scripts/to_adapterhub.py, scripts/from_adapterhub.py), Hugging Face
folders of runs without adapters (--format=hf), and the houlsby_layernorms choice. The slow tests load what was
written into AdapterHub `adapters` 1.3 itself, in the reference's own virtual environment (../shared/bench/peer/)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from conftest import missing_outside_ci
from flax import traverse_util

from adapter_jax import adapterhub, export, steps, trainable
from adapter_jax import bank as bank_lib
from adapter_jax import experiment as experiment_lib
from adapter_jax.errors import CheckpointError
from adapter_jax.evaluation import Evaluator
from adapter_jax.run_spec import RunSpec
from scripts import from_adapterhub, to_adapterhub

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO_ROOT / "tests" / "adapterhub_peer.py"


def _flat(params):
    return traverse_util.flatten_dict(params)


def test_export_converts_to_an_adapterhub_folder_with_side_file_and_readme(trained_run, tmp_path, capsys):
    out = tmp_path / "hub"
    to_adapterhub.main([f"--workdir={trained_run.workdir}", f"--out={out}", "--safetensors"])
    exported = export.read(trained_run.workdir)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [adapterhub.ADAPTER_CONFIG_FILE, adapterhub.HEAD_CONFIG_FILE, *adapterhub.SAFETENSORS_FILES,
         adapterhub.SIDE_FILE, adapterhub.README_FILE])
    config = json.loads((out / adapterhub.ADAPTER_CONFIG_FILE).read_text())
    assert config["config"]["reduction_factor"] == 32 / 8 and config["config"]["non_linearity"] == "gelu"
    assert config["name"] == "rte" and config["model_class"] == "BertAdapterModel"
    tensors = safetensors.numpy.load_file(out / adapterhub.SAFETENSORS_FILES[0])
    down = tensors["bert.encoder.layer.1.attention.output.adapters.rte.adapter_down.0.weight"]
    expected = exported.params["bert"]["encoder"]["layer_1"]["attention"]["output"]["adapter"]["down"]["kernel"]
    np.testing.assert_array_equal(down, expected.T)  # written transposed, not as the untransposed buffer
    assert len(tensors) == 2 * 2 * 4  # 2 layers x 2 sites x (down, up) x (weight, bias)
    side = safetensors.numpy.load_file(out / adapterhub.SIDE_FILE)
    assert len(side) == 2 + 2 * 2 * 2 and "bert.embeddings.LayerNorm.weight" in side  # the trained LayerNorms
    readme = (out / adapterhub.README_FILE).read_text()
    assert "use_safetensors=True" in readme and f"{out}/{adapterhub.SIDE_FILE}" in readme
    assert "10 trained base-model tensors" in capsys.readouterr().err


def test_round_trip_is_bit_identical(trained_run, tmp_path):
    to_adapterhub.main([f"--workdir={trained_run.workdir}", f"--out={tmp_path / 'hub'}"])  # .bin: torch is here
    assert (tmp_path / "hub" / adapterhub.TORCH_FILES[0]).is_file()
    path = from_adapterhub.main([f"--adapter={tmp_path / 'hub'}", f"--out={tmp_path / 'back'}"])
    _assert_bit_identical(path, trained_run.workdir)


def _assert_bit_identical(path, original_path):
    original_params, original_settings = export.read_raw(original_path)
    params, settings = export.read_raw(path)
    assert settings == original_settings
    original, back = _flat(original_params), _flat(params)
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].tobytes() == value.tobytes(), key


def test_round_trip_through_a_bucket_and_a_bucket_out_folder_refused(trained_run, gcs_env, tmp_path, capsys):
    from conftest import GCS_BUCKET
    from etils import epath

    bucket = epath.Path(f"gs://{GCS_BUCKET}/{tmp_path.name}")
    exported = bucket / "run" / export.EXPORT_FILE
    exported.write_bytes(export.export_file(trained_run.workdir).read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        to_adapterhub.main([f"--export={exported}", f"--out={bucket / 'hub'}"])
    assert exit_info.value.code == 2 and "must be a local folder" in capsys.readouterr().err
    to_adapterhub.main([f"--export={exported}", f"--out={tmp_path / 'hub'}"])
    for local in (tmp_path / "hub").iterdir():
        (bucket / "hub" / local.name).write_bytes(local.read_bytes())
    path = from_adapterhub.main([f"--adapter={bucket / 'hub'}", f"--out={bucket / 'back'}"])
    assert path.as_posix().startswith("gs://")
    _assert_bit_identical(path, trained_run.workdir)


def _hub_folder(trained_run, tmp_path) -> pathlib.Path:
    folder = tmp_path / "hub"
    to_adapterhub.convert(trained_run.workdir, folder, use_torch=False)
    return folder


@pytest.mark.parametrize(
    "change, field",
    [
        ({"non_linearity": "swish"}, "config.non_linearity='swish'"),
        # Pfeiffer (SeqBnConfig): one adapter after the feed-forward block, the LayerNorm before it.
        ({"mh_adapter": False, "original_ln_before": True, "non_linearity": "relu"}, "config.original_ln_before=True"),
        ({"scaling": "learned"}, "config.scaling='learned'"),
        ({"use_gating": True}, "config.use_gating=True"),
        ({"phm_layer": True}, "config.phm_layer=True"),
        ({"reduction_factor": {"default": 4}}, "config.reduction_factor"),
    ],
)
def test_import_refuses_what_is_not_computed_here(trained_run, tmp_path, capsys, change, field):
    folder = _hub_folder(trained_run, tmp_path)
    config_file = folder / adapterhub.ADAPTER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["config"].update(change)
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        from_adapterhub.main([f"--adapter={folder}", f"--out={tmp_path / 'back'}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert f"{adapterhub.ADAPTER_CONFIG_FILE}: {field}" in error


def test_export_refuses_a_size_adapterhub_would_round_differently():
    spec = RunSpec.from_dict({"task": "rte", "model": "m", "mode": "adapters", "top_k": 0, "train_pooler": False,
                              "max_seq_length": 32,
                              "adapter": {"size": 5, "init_std": 1e-3, "sites": ["attention"], "layers": None}})
    with pytest.raises(CheckpointError, match=r"^adapter\.size: .* int\(hidden_size // reduction_factor\), 4 "):
        adapterhub.hub_adapter_config(spec, hidden_size=32, num_layers=2)
    full = RunSpec.from_dict({**spec.to_dict(), "mode": "full"})
    with pytest.raises(CheckpointError, match="--format=hf"):
        adapterhub.hub_adapter_config(full, hidden_size=32, num_layers=2)
    with pytest.raises(CheckpointError, match="^name: 'rte.v2' cannot name"):  # AdapterHub's keys split on dots
        adapterhub.to_hub({}, spec, {}, name="rte.v2", hidden_size=32, num_layers=2, metadata={})


def test_frozen_layernorms_train_nothing_of_the_base_and_convert_with_no_side_file(
    tiny_config, trained_run, tmp_path, capsys
):
    from adapter_jax import train

    tiny_config.houlsby_layernorms = False
    tiny_config.num_train_steps = 2
    train.train_and_evaluate(tiny_config, tmp_path / "run")
    exported = export.read(tmp_path / "run")
    assert exported.spec.houlsby_layernorms is False
    assert not [path for path in _flat(exported.params) if "LayerNorm" in path]
    out = tmp_path / "hub"
    to_adapterhub.main([f"--workdir={trained_run.workdir}", f"--out={out}"])  # .bin files and a side file
    capsys.readouterr()
    to_adapterhub.main([f"--workdir={tmp_path / 'run'}", f"--out={out}", "--safetensors"])  # over them
    assert not (out / adapterhub.SIDE_FILE).exists() and "note:" not in capsys.readouterr().err
    assert not [name for name in adapterhub.TORCH_FILES if (out / name).exists()]
    back = from_adapterhub.main([f"--adapter={out}", f"--out={tmp_path / 'back'}"])
    assert export.read(back).spec == exported.spec
    # The imported export serves from an adapter bank as it predicts alone.
    ours, dataset = _logits(tiny_config, back)
    bank = bank_lib.AdapterBank.holding({"rte": export.read(back)}, batch_sizes=(8,), buckets=(32,))
    (banked,) = bank.logits([("rte", dataset)])
    np.testing.assert_allclose(banked[:, :2], ours, atol=1e-5, rtol=0)


def test_houlsby_layernorms_mask():
    shapes = {"bert": {"encoder": {"layer_0": {"output": {"LayerNorm": {"scale": 0}, "adapter": {"up": {"bias": 0}}}}}},
              "classifier": {"bias": 0}}
    frozen = _flat(trainable.trainable_mask(shapes, mode="adapters", num_layers=1, houlsby_layernorms=False))
    trained = _flat(trainable.trainable_mask(shapes, mode="adapters", num_layers=1))
    layer_norm = ("bert", "encoder", "layer_0", "output", "LayerNorm", "scale")
    assert trained[layer_norm] and not frozen[layer_norm]
    assert {key: value for key, value in frozen.items() if key != layer_norm} == {
        key: value for key, value in trained.items() if key != layer_norm}


def _logits(config, export_path) -> tuple[np.ndarray, object]:
    """Our logits over the dev set of the export's task, and that dataset."""
    from adapter_jax import input_pipeline

    experiment, config = export.load(config, export_path, purpose="evaluate")
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    dataset = experiment_lib.load_dev_datasets(config, experiment.task, tokenizer)["dev"]
    logits = Evaluator(experiment, config).logits(
        steps.replicate(experiment.trainable_params), steps.replicate(experiment.frozen_params), dataset)
    return logits, dataset


@pytest.mark.slow  # trains a tiny run per mode and loads it in transformers
@pytest.mark.parametrize("mode", ["full", "top_k", "layernorm"])
def test_run_without_adapters_exports_as_a_transformers_folder_with_equal_logits(tiny_config, tmp_path, mode):
    import torch
    import transformers

    from adapter_jax import train

    tiny_config.mode = mode
    tiny_config.top_k = 1
    tiny_config.num_train_steps = 2
    train.train_and_evaluate(tiny_config, tmp_path / "run")
    ours, dataset = _logits(tiny_config, tmp_path / "run")
    with pytest.raises(SystemExit):  # a run without adapters has nothing for AdapterHub
        to_adapterhub.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'x'}", "--format=adapterhub"])
    to_adapterhub.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}", "--format=hf"])
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    mask = np.arange(dataset.max_seq_length)[None] < dataset.lengths[:, None]
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(dataset.input_ids).long(),
                       token_type_ids=torch.from_numpy(dataset.token_type_ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    print(f"\n{mode} run -> transformers: max abs logit difference {np.abs(theirs - ours).max():.2g}", file=sys.stderr)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def peer_python() -> str:
    """The reference environment's Python (../shared/bench/peer/setup.sh); missing is a failure under CI."""
    from adapter_jax import reference

    if not os.access(reference.DEFAULT_PEER_PYTHON, os.X_OK):
        missing_outside_ci(f"no AdapterHub reference environment at {reference.DEFAULT_PEER_PYTHON} (run its setup.sh)")
    return reference.DEFAULT_PEER_PYTHON


@pytest.fixture(scope="module")
def real_rte_run(tmp_path_factory, glue_dir):
    """A short real run on RTE with MiniLM (2 steps, pooler trained), shared by this module's AdapterHub tests."""
    from adapter_jax import train
    from configs import glue

    config = glue.get_config("rte")
    config.glue_dir = str(glue_dir)
    config.train_pooler = True
    config.num_train_steps = 2
    config.global_batch_size = 8
    config.max_train_examples = 16
    config.learning_rate = 1e-3
    config.eval_batch_size = 64
    config.checkpoint_every_steps = 100
    workdir = tmp_path_factory.mktemp("real-rte") / "run"
    train.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.mark.slow  # MiniLM on all of RTE dev, here and in AdapterHub
def test_adapterhub_computes_our_logits_and_we_compute_its(real_rte_run, peer_python, tmp_path, capsys):
    config, workdir = real_rte_run
    ours, dataset = _logits(config, workdir)
    to_adapterhub.main([f"--workdir={workdir}", f"--out={tmp_path / 'hub'}"])
    assert "26 LayerNorm tensors, the pooler" in capsys.readouterr().err  # what a plain load_adapter loses, said
    to_adapterhub.main([f"--workdir={workdir}", f"--out={tmp_path / 'hub-safetensors'}", "--safetensors"])
    np.savez(tmp_path / "ids.npz", input_ids=dataset.input_ids, token_type_ids=dataset.token_type_ids,
             lengths=dataset.lengths, labels=dataset.labels)
    base = export.onto_base(export.read(workdir), config).model_dir
    subprocess.run([peer_python, str(PEER_SCRIPT), f"--base={base}", f"--ids={tmp_path / 'ids.npz'}",
                    f"--out={tmp_path}", f"--load={tmp_path / 'hub'}", f"--load={tmp_path / 'hub-safetensors'}",
                    f"--train={tmp_path / 'trained'}"],
                   check=True, capture_output=True, text=True)
    with_side, plain = np.load(tmp_path / "0.side.npy"), np.load(tmp_path / "0.plain.npy")
    print(f"\nRTE dev ({len(ours)} examples), ours -> AdapterHub: max abs logit difference "
          f"{np.abs(with_side - ours).max():.2g} with the side file, {np.abs(plain - ours).max():.2g} without "
          f"({np.mean(plain.argmax(-1) != ours.argmax(-1)):.1%} of predictions changed)", file=sys.stderr)
    assert len(ours) == 277
    np.testing.assert_allclose(with_side, ours, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(with_side.argmax(-1), ours.argmax(-1))
    np.testing.assert_array_equal(np.load(tmp_path / "1.side.npy"), with_side)  # the safetensors files load the same
    assert np.abs(plain - ours).max() > 1e-4  # the side file matters: the trained LayerNorms are not in the adapter

    imported = from_adapterhub.main([f"--adapter={tmp_path / 'trained'}", f"--out={tmp_path / 'imported'}"])
    spec = export.read(imported).spec
    assert not spec.houlsby_layernorms and spec.train_pooler and spec.adapter.size == 64
    ours_of_theirs, _ = _logits(config, imported)
    theirs = np.load(tmp_path / "trained.npy")
    print(f"AdapterHub-trained adapter -> ours: max abs logit difference {np.abs(ours_of_theirs - theirs).max():.2g}",
          file=sys.stderr)
    np.testing.assert_allclose(ours_of_theirs, theirs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours_of_theirs.argmax(-1), theirs.argmax(-1))
