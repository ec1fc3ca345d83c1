"""Scoring a model on dev: logits over a dataset, and the task's GLUE metrics on each labelled split."""

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from adapter_jax import experiment as experiment_lib
from adapter_jax import input_pipeline, metrics, steps, tasks


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
