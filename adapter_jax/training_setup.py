"""What a training run of a config steps with, built in one place: the train iterator, the optimizer and its
schedule, the initial state and the pmapped step. train.py, scripts/benchmark.py and scripts/profile_step.py all
build them here, so that what the benchmark times is what training runs."""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax
import transformers

from adapter_jax import experiment as experiment_lib
from adapter_jax import input_pipeline, optim, steps, weights


@dataclasses.dataclass
class TrainingSetup:
    """A run's training pieces. The frozen weights live on the devices alone (`p_frozen`): the experiment keeps
    no host copy of them, which would only double their memory."""

    experiment: experiment_lib.Experiment  # frozen_params is None
    tokenizer: transformers.PreTrainedTokenizerFast
    train_iter: input_pipeline.TrainIterator
    total_steps: int
    schedule: optax.Schedule  # the learning rate at each optimizer count (the update that makes step s uses s - 1)
    tx: optax.GradientTransformation
    initial_state: steps.TrainState  # on the host
    p_frozen: Any  # the frozen parameters, replicated over the local devices, in config.dtype (steps.replicate_frozen)
    p_train_step: Callable  # (replicated state, p_frozen, batch) -> (state, device metrics)
    parameter_summary: dict[str, Any]


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """config.num_train_steps if set, else num_epochs epochs."""
    return config.num_train_steps or config.num_epochs * steps_per_epoch


def build(config: ml_collections.ConfigDict, model_folder: weights.ModelFolder | None = None) -> TrainingSetup:
    """Builds the experiment of `config` (from `model_folder` if already opened) and what trains it."""
    experiment = experiment_lib.build(config, model_folder)
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    train_iter = input_pipeline.TrainIterator(
        experiment_lib.load_dataset(config, experiment.task, "train", tokenizer),
        input_pipeline.Layout.from_config(config),
        seed=config.seed,
    )
    steps_total = total_steps(config, train_iter.steps_per_epoch)
    schedule_settings = {
        "learning_rate": config.learning_rate,
        "total_steps": steps_total,
        "warmup_fraction": config.warmup_fraction,
    }
    tx = optim.create_optimizer(
        **schedule_settings,
        weight_decay=config.weight_decay,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
    )
    return TrainingSetup(
        experiment=dataclasses.replace(experiment, frozen_params=None),
        tokenizer=tokenizer,
        train_iter=train_iter,
        total_steps=steps_total,
        schedule=optim.learning_rate_schedule(**schedule_settings),
        tx=tx,
        initial_state=steps.initial_state(experiment.trainable_params, tx, config.seed),
        p_frozen=steps.replicate_frozen(experiment.frozen_params, config.dtype),
        p_train_step=steps.pmapped_train_step(experiment.model, tx, experiment.task.is_regression),
        parameter_summary=experiment.parameter_summary(),
    )
