"""Scoring a model: logits over a dataset, GLUE metrics on dev, and `predict` (test submission files)."""

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from adapter_jax import bank as bank_lib
from adapter_jax import experiment as experiment_lib
from adapter_jax import (
    export,
    input_pipeline,
    metrics,
    steps,
    submission,
    tasks,
    validation,
)
from adapter_jax.errors import CheckpointError
from adapter_jax.workdir import Workdir, WorkdirLock, is_primary_process, write_shared


def to_predictions(logits: np.ndarray, task: tasks.Task) -> np.ndarray:
    """Class indices, or the score for a regression task."""
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


class Evaluator:
    """Scores one experiment's model with parameters replicated over the local devices (steps.replicate)."""

    def __init__(self, experiment: experiment_lib.Experiment, config: ml_collections.ConfigDict):
        self._p_eval_step = steps.pmapped_eval_step(experiment.model)
        self._num_labels = experiment.task.num_labels
        self._layout = input_pipeline.Layout.from_config(config)

    def logits(self, trainable_params: Any, frozen_params: Any, dataset: input_pipeline.TokenizedDataset) -> np.ndarray:
        """Logits [examples, num_labels] for every example of `dataset`, in dataset order, on every host."""
        outputs = np.zeros((len(dataset), self._num_labels), np.float32)
        for batch in input_pipeline.eval_batches(dataset, self._layout):
            logits = np.asarray(self._p_eval_step(trainable_params, frozen_params, batch))
            rows, weight = batch["idx"], batch["weight"]
            if jax.process_count() > 1:  # each host scored its slice of the batch; every host needs all rows
                logits, rows, weight = multihost_utils.process_allgather((logits, rows, weight))
            real = weight.reshape(-1) > 0
            outputs[rows.reshape(-1)[real]] = logits.reshape(-1, logits.shape[-1])[real]
        return outputs

    def evaluate(
        self, trainable_params: Any, frozen_params: Any, datasets: Mapping[str, input_pipeline.TokenizedDataset],
        task: tasks.Task,
    ) -> dict[str, dict[str, float]]:
        """The task's metrics on each labelled split, e.g. {'dev': {'accuracy': 0.71}}."""
        return {
            split: metrics.compute_metrics(
                task, to_predictions(self.logits(trainable_params, frozen_params, dataset), task), dataset.labels
            )
            for split, dataset in datasets.items()
        }


def load_export(
    config: ml_collections.ConfigDict, path: epath.PathLike, purpose: str = "predict"
) -> tuple[experiment_lib.Experiment, ml_collections.ConfigDict]:
    """The base model of `config` with the export at `path` on it, and the config with the export's own
    settings (task, what trained, adapters, sequence length) in place, checked for `purpose` (a
    validation.PURPOSES: "predict" needs the test files, "evaluate" dev alone)."""
    trained, settings = export.read(path)
    config = export.config_for_export(config, settings)
    model_folder = validation.validate_config(config, purpose=purpose)
    return export.onto_base(config, trained, settings, path, model_folder), config


def predict(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Loads base model + <workdir>/export, scores dev, and writes GLUE submission files for test.

    The export's settings replace the config's before it is checked (load_export), but for its task,
    which must be the config's. For MNLI the diagnostic set (AX) is predicted too, as GLUE asks. The
    files are complete when <workdir>/submission/complete.json, written last, lists them.
    """
    workdir = Workdir(workdir)
    with WorkdirLock(workdir):
        return _predict(config, workdir)


def _predict(config: ml_collections.ConfigDict, workdir: Workdir) -> dict[str, Any]:
    asked_task = config.task
    experiment, config = load_export(config, workdir.export_dir)
    task = experiment.task
    if task.name != tasks.get_task(asked_task).name:
        raise CheckpointError(
            f"the adapter export in {workdir.export_dir} was trained for {task.name}, but the config "
            f"names {asked_task}; pass --config=configs/glue.py:{config.task} to predict {task.name}"
        )
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    evaluator = Evaluator(experiment, config)
    params = steps.replicate(experiment.trainable_params)
    frozen = steps.replicate(experiment.frozen_params)
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

    Each export's settings replace the config's for its own task, as in `predict`. The bank runs on one
    device in float32, whatever config.dtype says.
    """
    workdirs = {str(workdir): Workdir(workdir) for workdir in workdirs}
    with contextlib.ExitStack() as locks:
        for workdir in workdirs.values():
            locks.enter_context(WorkdirLock(workdir))
        return _predict_together(config, workdirs)


def _predict_together(config: ml_collections.ConfigDict, workdirs: Mapping[str, Workdir]) -> dict[str, Any]:
    task_configs = {}
    for name, workdir in workdirs.items():
        _, settings = export.read(workdir.export_dir)
        task_configs[name] = export.config_for_export(config, settings)
        validation.validate_config(task_configs[name], purpose="predict")
    bank = bank_lib.AdapterBank(
        config.model,
        capacity=len(workdirs),
        max_adapter_size=max(c.adapter_size if c.mode == "adapters" else 0 for c in task_configs.values()),
        max_seq_length=max(c.max_seq_length for c in task_configs.values()),
        batch_sizes=(config.eval_batch_size,),
        buckets=tuple(config.buckets),
    )
    parts, splits = [], []  # (run, dataset) for the bank, and (predicted task, split) beside each
    for name, workdir in workdirs.items():
        task = bank.load(name, workdir.export_dir).task
        predicted = [(task, split) for split in task.dev_splits]
        predicted += [(test_task, split) for test_task in tasks.prediction_tasks(task) for split in test_task.test_splits]
        for predicted_task, split in predicted:
            parts.append((name, experiment_lib.load_dataset(task_configs[name], predicted_task, split, bank.tokenizer)))
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
