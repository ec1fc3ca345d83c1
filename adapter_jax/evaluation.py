"""Scoring a model: logits over a dataset, GLUE metrics on dev, and `predict` (test submission files)."""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from adapter_jax import experiment as experiment_lib
from adapter_jax import (
    export,
    input_pipeline,
    metrics,
    run_utils,
    steps,
    submission,
    tasks,
    validation,
)
from adapter_jax.errors import CheckpointError


def to_predictions(logits: np.ndarray, task: tasks.Task) -> np.ndarray:
    """Class indices, or the score for a regression task."""
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


class Evaluator:
    """Scores one experiment's model with parameters replicated over the local devices (steps.replicate)."""

    def __init__(self, experiment: experiment_lib.Experiment, config: ml_collections.ConfigDict):
        self._p_eval_step = steps.pmapped_eval_step(experiment.model)
        self._num_labels = experiment.task.num_labels
        self._eval_batch_size = config.eval_batch_size
        self._buckets = tuple(config.buckets)

    def logits(self, trainable_params: Any, frozen_params: Any, dataset: input_pipeline.TokenizedDataset) -> np.ndarray:
        """Logits [examples, num_labels] for every example of `dataset`, in dataset order, on every host."""
        outputs = np.zeros((len(dataset), self._num_labels), np.float32)
        for batch in input_pipeline.eval_batches(
            dataset,
            global_batch_size=self._eval_batch_size,
            num_devices=jax.local_device_count(),
            buckets=self._buckets,
        ):
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
    workdir = epath.Path(workdir)
    with run_utils.WorkdirLock(workdir):
        return _predict(config, workdir)


def _predict(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, Any]:
    asked_task = config.task
    experiment, config = load_export(config, workdir / export.EXPORT_DIR)
    task = experiment.task
    if task.name != tasks.get_task(asked_task).name:
        raise CheckpointError(
            f"the adapter export in {workdir / export.EXPORT_DIR} was trained for {task.name}, but the config "
            f"names {asked_task}; pass --config=configs/glue.py:{config.task} to predict {task.name}"
        )
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    evaluator = Evaluator(experiment, config)
    params = steps.replicate(experiment.trainable_params)
    frozen = steps.replicate(experiment.frozen_params)
    dev_data = {split: experiment_lib.load_dataset(config, task, split, tokenizer) for split in task.dev_splits}
    dev_results = evaluator.evaluate(params, frozen, dev_data, task)
    files = []
    for predicted_task in tasks.prediction_tasks(task):
        for split in predicted_task.test_splits:
            dataset = experiment_lib.load_dataset(config, predicted_task, split, tokenizer)
            predictions = to_predictions(evaluator.logits(params, frozen, dataset), task)
            path = submission.write_submission(predicted_task, split, dataset.idx, predictions, workdir / submission.SUBMISSION_DIR)
            files.append(str(path))
    if jax.process_index() == 0:
        run_utils.write_atomic(workdir / submission.SUBMISSION_DIR / submission.COMPLETE_FILE,
                               json.dumps({"files": [pathlib.PurePath(f).name for f in files]}))
    return {"dev_metrics": dev_results, "submission_files": files}
