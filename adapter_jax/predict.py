"""Prediction: an exported run's dev metrics and GLUE test submission files, one run at a time (`predict`) or
several runs' exports in one AdapterBank (`predict_together`)."""

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from adapter_jax import bank as bank_lib
from adapter_jax import (
    compilation_cache,
    export,
    input_pipeline,
    metrics,
    steps,
    submission,
    tasks,
)
from adapter_jax import experiment as experiment_lib
from adapter_jax.errors import CheckpointError
from adapter_jax.evaluation import Evaluator, to_predictions
from adapter_jax.lock import WorkdirLock
from adapter_jax.workdir import Workdir, is_primary_process, write_shared


def predict(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Loads base model + <workdir>/export, scores dev, and writes GLUE submission files for test.

    The export's run, not the config's, is loaded (export.load); its task must be the config's. For MNLI the
    diagnostic set (AX) is predicted too, as GLUE asks. The files are complete when
    <workdir>/submission/complete.json, written last, lists them.
    """
    workdir = Workdir(workdir)
    compilation_cache.use(config.compilation_cache_dir)
    with WorkdirLock(workdir, config.lock_lease_seconds):
        return _predict(config, workdir)


def _predict(config: ml_collections.ConfigDict, workdir: Workdir) -> dict[str, Any]:
    asked_task = config.task
    experiment, config = export.load(config, workdir.export_dir)
    task = experiment.task
    if task.name != tasks.get_task(asked_task).name:
        raise CheckpointError(
            f"the adapter export in {workdir.export_dir} was trained for {task.name}, but the config "
            f"names {asked_task}; pass --config=configs/glue.py:{config.task} to predict {task.name}"
        )
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    evaluator = Evaluator(experiment, config)
    params = steps.replicate(experiment.trainable_params)
    frozen = steps.replicate_frozen(experiment.frozen_params, config.dtype)
    dev_data = experiment_lib.load_dev_datasets(config, task, tokenizer)
    dev_results = evaluator.evaluate(params, frozen, dev_data, task)
    files = []
    for predicted_task in tasks.prediction_tasks(task):
        for split in predicted_task.test_splits:
            dataset = experiment_lib.load_dataset(config, predicted_task, split, tokenizer)
            predictions = to_predictions(evaluator.logits(params, frozen, dataset), task)  # every host scores
            files.append(_write_submission(predicted_task, split, dataset.idx, predictions, workdir))
    _mark_complete(workdir, files)
    return {"dev_metrics": dev_results, "submission_files": files}


def _write_submission(task: tasks.Task, split: str, idx: np.ndarray, predictions: np.ndarray,
                      workdir: Workdir) -> str:
    """Writes one leaderboard file of `workdir` (on a pod, process 0 alone: one writer per file); returns its path."""
    if is_primary_process():
        submission.write_submission(task, split, idx, predictions, workdir.submission_dir)
    return str(workdir.submission_dir / task.submission_files[split])


def _mark_complete(workdir: Workdir, files: Sequence[str]) -> None:
    """Records, last, that the submission files of `workdir` are all written (a sweep's rerun redoes them otherwise)."""
    write_shared(workdir.submission_complete, json.dumps({"files": [epath.Path(f).name for f in files]}))


def predict_together(config: ml_collections.ConfigDict, workdirs: Sequence[epath.PathLike]) -> dict[str, Any]:
    """`predict` for several runs in one pass: every run's export in one AdapterBank, all their dev and test
    sets scored in the same mixed batches; each workdir gets its own dev metrics and submission files.

    Each export's own run is loaded, as in `predict`; the config gives the base model and data. The bank runs on one
    device in float32, whatever config.dtype says.
    """
    workdirs = {str(workdir): Workdir(workdir) for workdir in workdirs}
    compilation_cache.use(config.compilation_cache_dir)
    with contextlib.ExitStack() as locks:
        for workdir in workdirs.values():
            locks.enter_context(WorkdirLock(workdir, config.lock_lease_seconds))
        return _predict_together(config, workdirs)


def _predict_together(config: ml_collections.ConfigDict, workdirs: Mapping[str, Workdir]) -> dict[str, Any]:
    exports = {name: export.read(workdir.export_dir) for name, workdir in workdirs.items()}
    data_configs = {name: export.data_config(exported, config, "predict")[0] for name, exported in exports.items()}
    bank = bank_lib.AdapterBank.holding(
        exports, config.model, batch_sizes=(config.eval_batch_size,), buckets=tuple(config.buckets)
    )
    parts, splits = [], []  # (run, dataset) for the bank, and (predicted task, split) beside each
    for name in workdirs:
        task = bank.slot(name).task
        predicted = [(task, split) for split in task.dev_splits]
        predicted += [(test_task, split) for test_task in tasks.prediction_tasks(task) for split in test_task.test_splits]
        for predicted_task, split in predicted:
            parts.append((name, experiment_lib.load_dataset(data_configs[name], predicted_task, split, bank.tokenizer)))
            splits.append((predicted_task, split))
    results = {name: {"dev_metrics": {}, "submission_files": []} for name in workdirs}
    for (name, dataset), (predicted_task, split), logits in zip(parts, splits, bank.logits(parts), strict=True):
        task = bank.slot(name).task
        predictions = to_predictions(logits, task)
        if split in task.dev_splits:
            results[name]["dev_metrics"][split] = metrics.compute_metrics(task, predictions, dataset.labels)
        else:
            results[name]["submission_files"].append(
                _write_submission(predicted_task, split, dataset.idx, predictions, workdirs[name]))
    for name, workdir in workdirs.items():
        _mark_complete(workdir, results[name]["submission_files"])
    return results
