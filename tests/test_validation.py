"""Bad configs and bad input files are refused up front, with the project's error types naming the key
or file at fault; several problems are reported together; the entry point prints `error: ...`, exit 2."""

import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from adapter_jax import (
    checkpoint,
    errors,
    export,
    glue_data,
    tasks,
    validation,
    weights,
)
from adapter_jax.workdir import Workdir

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _validate(config, workdir):
    return lambda: validation.validate_config(config, workdir)


def _set(**changes):
    """A case that changes config keys, then validates; expects the message to name the first key."""

    def case(config, tmp_path, model_dir, glue_dir):
        for key, value in changes.items():
            config[key] = value
        return _validate(config, tmp_path / "work"), f"{next(iter(changes))}: "

    return case


def _missing_key(config, tmp_path, model_dir, glue_dir):
    del config["seed"]
    return _validate(config, tmp_path / "work"), "seed: missing"


def _batch_not_divisible(config, tmp_path, model_dir, glue_dir):
    devices = jax.device_count()
    config.global_batch_size = 4 * devices + 1
    expected = f"global_batch_size: {4 * devices + 1} is not divisible by the {devices} devices"
    return _validate(config, tmp_path / "work"), expected


def _model_folder_missing(config, tmp_path, model_dir, glue_dir):
    config.model = str(tmp_path / "no-model")
    return _validate(config, tmp_path / "work"), f"model: model folder not found: {tmp_path / 'no-model'}"


def _glue_folder_without_task_files(config, tmp_path, model_dir, glue_dir):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    config.glue_dir = str(tmp_path / "glue")
    expected = (f"glue_dir: {tmp_path / 'glue' / 'RTE' / 'train.tsv'} not found (task rte, split train); to download "
                f"it, run python -m scripts.download_glue --tasks=rte --out={tmp_path / 'glue'}")
    return _validate(config, tmp_path / "work"), expected


def _unwritable_workdir(config, tmp_path, model_dir, glue_dir):
    (tmp_path / "a-file").write_text("")  # a folder cannot be made below a file, even by root
    return _validate(config, tmp_path / "a-file" / "work"), f"workdir: {tmp_path / 'a-file' / 'work'} cannot be written"


def _corrupt_checkpoint_in_workdir(config, tmp_path, model_dir, glue_dir):
    workdir = tmp_path / "work"
    manager = checkpoint.checkpoint_manager(workdir)
    checkpoint.save_checkpoint(manager, 4, {"x": np.zeros(2, np.float32)}, {"config": config.to_dict()})
    manager.wait_until_finished()
    for path in (workdir / "checkpoints" / "4" / "meta").iterdir():
        path.write_text("{not json")
    return _validate(config, workdir), f"workdir: cannot read the metadata of checkpoint step 4 in {workdir}"


def _copy_glue(glue_dir, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(glue_dir, tmp_path / "glue"))


def _tsv_wrong_field_count(config, tmp_path, model_dir, glue_dir):
    train = _copy_glue(glue_dir, tmp_path) / "RTE" / "train.tsv"
    train.write_text(train.read_text() + "64\tno hypothesis\tentailment\n")
    read = lambda: glue_data.read_examples(tasks.get_task("rte"), "train", glue_dir=tmp_path / "glue")
    return read, f"{train}:66: expected 4 tab-separated fields, found 3"


def _tsv_not_utf8(config, tmp_path, model_dir, glue_dir):
    dev = _copy_glue(glue_dir, tmp_path) / "RTE" / "dev.tsv"
    dev.write_bytes(dev.read_bytes().replace(b"cat", b"c\xe9t", 1))
    read = lambda: glue_data.read_examples(tasks.get_task("rte"), "dev", glue_dir=tmp_path / "glue")
    return read, f"{dev}: not UTF-8 text"


def _tsv_nan_regression_label(config, tmp_path, model_dir, glue_dir):
    train = tmp_path / "glue" / "STS-B" / "train.tsv"
    train.parent.mkdir(parents=True)
    train.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\t2.5\n1\tc\td\tnan\n")
    read = lambda: glue_data.read_examples(tasks.get_task("stsb"), "train", glue_dir=tmp_path / "glue")
    return read, f"{train}:3: bad regression label 'nan'"


def _copy_model(model_dir, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(model_dir, tmp_path / "model"))


def _model_config_not_json(config, tmp_path, model_dir, glue_dir):
    path = _copy_model(model_dir, tmp_path) / "config.json"
    path.write_text('{"hidden_size": 32,')
    return lambda: weights.load_pretrained(path.parent), f"cannot read BERT config {path}"


def _empty_pytorch_bin(config, tmp_path, model_dir, glue_dir):
    folder = _copy_model(model_dir, tmp_path)
    (folder / weights.SAFETENSORS_FILE).unlink()
    (folder / weights.TORCH_FILE).write_bytes(b"")
    return lambda: weights.load_pretrained(folder), f"cannot read weights file {folder / weights.TORCH_FILE}"


def _export(tmp_path) -> pathlib.Path:
    params = {"classifier": {"bias": np.zeros(2, np.float32), "kernel": np.ones((32, 2), np.float32)}}
    return export.write(tmp_path / "export", params, {"task": "rte", "format": 1})


def _export_truncated(config, tmp_path, model_dir, glue_dir):
    path = _export(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    return lambda: export.read(path), f"adapter export {path} is corrupt"


def _export_header_garbage(config, tmp_path, model_dir, glue_dir):
    path = _export(tmp_path)
    path.write_bytes((2**40).to_bytes(8, "little") + path.read_bytes()[8:])
    return lambda: export.read(path.parent), f"adapter export {path} is corrupt"


def _export_of_another_program(config, tmp_path, model_dir, glue_dir):
    path = Workdir(tmp_path).export_file
    path.parent.mkdir()
    shutil.copy(model_dir / weights.SAFETENSORS_FILE, path)  # valid safetensors, no adapter-jax header
    return lambda: export.read(path), f"adapter export {path} is corrupt or not an adapter-jax export"


def _export_missing(config, tmp_path, model_dir, glue_dir):
    return lambda: export.read(tmp_path / "export"), f"adapter export not found: {tmp_path / 'export'}"


CASES = [
    ("unknown_key", errors.ConfigError, _set(learning_rat=3e-4)),
    ("missing_key", errors.ConfigError, _missing_key),
    ("learning_rate_zero", errors.ConfigError, _set(learning_rate=0.0)),
    ("learning_rate_negative", errors.ConfigError, _set(learning_rate=-3e-4)),
    ("learning_rate_infinite", errors.ConfigError, _set(learning_rate=math.inf)),
    ("num_epochs_zero", errors.ConfigError, _set(num_epochs=0)),
    ("num_epochs_negative", errors.ConfigError, _set(num_epochs=-3)),
    ("global_batch_not_divisible_by_devices", errors.ConfigError, _batch_not_divisible),
    ("adapter_size_zero", errors.ConfigError, _set(adapter_size=0)),
    ("adapter_size_above_hidden_size", errors.ConfigError, _set(adapter_size=33)),
    ("unknown_task", errors.ConfigError, _set(task="rtee")),
    ("task_without_train_split", errors.ConfigError, _set(task="ax")),
    ("unknown_mode", errors.ConfigError, _set(mode="adapter")),
    ("max_length_above_positions", errors.ConfigError, _set(max_seq_length=65)),
    ("dropout_of_one", errors.ConfigError, _set(dropout_rate=1.0)),
    ("unknown_adapter_site", errors.ConfigError, _set(adapter_sites=("ffn",))),
    ("unknown_on_nonfinite", errors.ConfigError, _set(on_nonfinite="ignore")),
    ("model_folder_missing", errors.ConfigError, _model_folder_missing),
    ("glue_folder_without_task_files", errors.ConfigError, _glue_folder_without_task_files),
    ("unwritable_workdir", errors.ConfigError, _unwritable_workdir),
    ("corrupt_checkpoint_in_workdir", errors.ConfigError, _corrupt_checkpoint_in_workdir),
    ("tsv_wrong_field_count", errors.DataError, _tsv_wrong_field_count),
    ("tsv_not_utf8", errors.DataError, _tsv_not_utf8),
    ("tsv_nan_regression_label", errors.DataError, _tsv_nan_regression_label),
    ("model_config_not_json", errors.WeightsError, _model_config_not_json),
    ("empty_pytorch_bin", errors.WeightsError, _empty_pytorch_bin),
    ("export_truncated", errors.CheckpointError, _export_truncated),
    ("export_header_garbage", errors.CheckpointError, _export_header_garbage),
    ("export_of_another_program", errors.CheckpointError, _export_of_another_program),
    ("export_missing", errors.CheckpointError, _export_missing),
]


@pytest.mark.parametrize("error_type, case", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_or_input_is_refused_naming_the_key_or_file(
    tiny_config, tmp_path, tiny_model_dir, tiny_glue_dir, error_type, case
):
    run, expected = case(tiny_config, tmp_path, tiny_model_dir, tiny_glue_dir)
    with pytest.raises(errors.AdapterJaxError) as info:
        run()
    assert type(info.value) is error_type, info.value
    assert expected in str(info.value)


def test_every_problem_is_reported_at_once(tiny_config, tmp_path):
    tiny_config.learning_rate = -1.0
    tiny_config.num_epochs = 0
    tiny_config.mode = "everything"
    tiny_config.max_seq_length = 65  # a valid value on its own, too long for the model
    tiny_config.glue_dir = str(tmp_path / "no-glue")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(errors.ConfigError) as info:
        validation.validate_config(tiny_config, tmp_path / "a-file" / "work")
    keys = re.findall(r"^  - (\w+):", str(info.value), flags=re.MULTILINE)
    assert keys == ["mode", "learning_rate", "num_epochs", "max_seq_length", "glue_dir", "glue_dir", "workdir"]
    assert "must be one of ('adapters', " in str(info.value)  # and what is allowed


def test_a_valid_config_passes(tiny_config, tmp_path):
    validation.validate_config(tiny_config, tmp_path)


def test_resuming_with_an_incompatible_config_lists_the_differences(tiny_config, tmp_path, tiny_model_dir, minilm_dir):
    manager = checkpoint.checkpoint_manager(tmp_path)
    checkpoint.save_checkpoint(manager, 4, {"x": np.zeros(2, np.float32)}, {"config": tiny_config.to_dict()})
    manager.wait_until_finished()
    tiny_config.log_every_steps = 10  # bookkeeping may change on resume
    validation.validate_config(tiny_config, tmp_path)

    tiny_config.model = str(minilm_dir)
    tiny_config.adapter_size = 16
    with pytest.raises(errors.ConfigError) as info:
        validation.validate_config(tiny_config, tmp_path)
    message = str(info.value)
    assert f"workdir: {tmp_path} holds a run with another config" in message
    assert "adapter_size: checkpoint has 8, config has 16" in message
    assert f"model: checkpoint has '{tiny_model_dir}', config has '{minilm_dir}'" in message
    assert "log_every_steps" not in message


@pytest.mark.slow  # the entry point in subprocesses
def test_entry_point_prints_error_and_exits_2_without_a_traceback(tiny_model_dir, tiny_glue_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"]}
    common = [sys.executable, "-m", "adapter_jax.main", "--config=configs/glue.py:rte", f"--workdir={tmp_path}"]
    result = subprocess.run(
        [*common, f"--config.model={tiny_model_dir}", f"--config.glue_dir={tiny_glue_dir}",
         "--config.learning_rate=-1", "--config.num_epochs=0", "--config.task=ax"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r"^error: invalid config:$", result.stderr, flags=re.MULTILINE), result.stderr
    for key in ("task", "learning_rate", "num_epochs"):
        assert f"  - {key}: " in result.stderr

    # A key the config does not have fails in flag parsing, before JAX starts: same form.
    result = subprocess.run(
        [*common, "--config.learning_rat=1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --config: unknown key 'learning_rat'"), result.stderr
    assert 'Did you mean "learning_rate"' in result.stderr


def test_a_run_saved_before_packing_existed_resumes_only_unpacked(tiny_config, tmp_path):
    saved = tiny_config.to_dict()
    del saved["packing"]  # a checkpoint written before the key existed: that run was bucketed
    manager = checkpoint.checkpoint_manager(tmp_path)
    checkpoint.save_checkpoint(manager, 4, {"x": np.zeros(2, np.float32)}, {"config": saved})
    manager.wait_until_finished()
    tiny_config.packing = True
    with pytest.raises(errors.ConfigError, match="packing: checkpoint has False, config has True"):
        validation.validate_config(tiny_config, tmp_path)
    tiny_config.packing = False
    validation.validate_config(tiny_config, tmp_path)
