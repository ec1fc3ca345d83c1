"""The training loop: `train_and_evaluate(config, workdir)`.

config -> training_setup.build (the model, its parameters split by trainable.py's mask, the train
iterator, the optimizer, the pmapped steps.train_step) -> checkpoint (orbax, every few steps and each
epoch) -> evaluation on dev each epoch -> export (the best-on-dev trained parameters) -> summary.json.
"""

import contextlib
import dataclasses
import json
import math
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from adapter_jax import (
    checkpoint,
    compilation_cache,
    evaluation,
    export,
    metrics,
    steps,
    training_setup,
    validation,
)
from adapter_jax import experiment as experiment_lib
from adapter_jax.errors import CheckpointError, NonFiniteLoss, Preempted, WriteFailed
from adapter_jax.history import HistoryWriter
from adapter_jax.lock import WorkdirLock
from adapter_jax.logs import console
from adapter_jax.results import RunResult
from adapter_jax.stop_signals import StopSignals
from adapter_jax.workdir import Workdir, is_primary_process, write_shared


@dataclasses.dataclass
class Progress:
    """What the loop knows beside the training state; saved with every checkpoint, restored on resume."""

    best_score: float = -math.inf
    best_step: int = 0
    best_metrics: dict = dataclasses.field(default_factory=dict)  # split -> metric -> value
    skipped_steps: int = 0  # non-finite steps left out (on_nonfinite="skip")
    last_finite_loss: float = math.nan
    wall_time_s: float = 0.0  # up to the latest checkpoint, over every process that ran this run
    saved_step: int = 0  # the step of the latest checkpoint

    def record(self, step: int, score: float, results: dict) -> bool:
        """Keeps `results` if they are the best yet; says whether they were."""
        if score <= self.best_score:
            return False
        self.best_score, self.best_step, self.best_metrics = score, step, results
        return True


def _fields(state: steps.TrainState) -> dict[str, Any]:
    """The state as a dict of its fields (not dataclasses.asdict, which would copy every array)."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


def _save(
    manager, state: steps.TrainState, progress: Progress, data_position: dict, config: ml_collections.ConfigDict,
    force: bool,
) -> None:
    """Checkpoints the host `state` with the loop's progress, the data position and the config."""
    progress.saved_step = int(state.step)
    meta = {"progress": dataclasses.asdict(progress), "data": data_position, "config": config.to_dict()}
    checkpoint.save_checkpoint(manager, int(state.step), _fields(state), meta, force=force)


def _restore(manager, state: steps.TrainState) -> tuple[steps.TrainState, Progress, dict | None]:
    """(state, progress, data position) of the latest checkpoint, or the given state and a new Progress."""
    restored = checkpoint.restore_checkpoint(manager, _fields(state))
    if restored is None:
        return state, Progress(), None
    saved, meta = restored
    try:
        progress = Progress(**meta["progress"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata in {manager.directory} is not this version's: {e}") from e
    logging.info("Resumed from %s at step %d.", manager.directory, progress.saved_step)
    return steps.TrainState(**saved), progress, meta["data"]


class _StepMetrics:
    """Device metrics of recent steps, read in batches so that the host does not wait on every step."""

    def __init__(self, progress: Progress, on_nonfinite: str, checkpoint_dir: epath.Path):
        self._progress, self._on_nonfinite, self._checkpoint_dir = progress, on_nonfinite, checkpoint_dir
        self._pending: list[tuple[int, dict]] = []
        self._losses: list[float] = []  # finite losses since the last log line

    def add(self, step: int, device_metrics: dict) -> None:
        self._pending.append((step, device_metrics))

    def read(self) -> None:
        """Reads what is pending; a non-finite step raises NonFiniteLoss or is counted as skipped."""
        for step, device_metrics in jax.device_get(self._pending):
            step_metrics = jax.tree.map(lambda x: x[0].item(), device_metrics)
            if step_metrics["finite"]:
                self._progress.last_finite_loss = step_metrics["loss"]
                self._losses.append(step_metrics["loss"])
                continue
            if self._on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {step} (loss {step_metrics['loss']}, "
                    f"gradient norm {step_metrics['grad_norm']}); last finite loss "
                    f"{self._progress.last_finite_loss:.6g}. The last checkpoint in {self._checkpoint_dir} "
                    f"is kept; lower the learning rate or set --config.on_nonfinite=skip."
                )
            self._progress.skipped_steps += 1
        self._pending.clear()

    def window_loss(self) -> float:
        """The mean finite loss since the last call (the last finite loss if there was none)."""
        self.read()
        loss = float(np.mean(self._losses)) if self._losses else self._progress.last_finite_loss
        self._losses.clear()
        return loss


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains on the task's train split, evaluates on dev every epoch, checkpoints, and resumes.

    Returns (and writes to <workdir>/summary.json) the best-on-dev metrics and run facts. The
    best-on-dev trained parameters are exported to <workdir>/export/adapters.safetensors.
    """
    start_time = time.time()
    workdir = Workdir(workdir)
    compilation_cache.use(config.compilation_cache_dir)
    model_folder = validation.validate_config(config, workdir.path)
    with WorkdirLock(workdir, config.lock_lease_seconds):
        return _train_and_evaluate(config, workdir, model_folder, start_time)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: Workdir, model_folder, start_time: float
) -> dict[str, Any]:
    setup = training_setup.build(config, model_folder)
    task = setup.experiment.task
    dev_data = experiment_lib.load_dev_datasets(config, task, setup.tokenizer)
    manager = checkpoint.checkpoint_manager(workdir, max_to_keep=config.checkpoints_to_keep,
                                            deadline_minutes=config.storage_deadline_minutes)
    state, progress, data_position = _restore(manager, setup.initial_state)
    if data_position is not None:
        setup.train_iter.restore(data_position)
    if not workdir.history_config.exists():
        # What validation compares a rerun with when the history has no checkpoint beside it.
        write_shared(workdir.history_config, json.dumps(config.to_dict(), indent=2))
    loop = _Loop(config, workdir, setup, manager, state, progress, start_time)
    last_results = loop.run(dev_data)

    summary = _run_result(
        config, setup.experiment, progress, last_results, total_steps=setup.total_steps,
        steps_per_epoch=setup.train_iter.steps_per_epoch, wall_time_s=loop.wall_time_s(),
        parameter_summary=setup.parameter_summary,
    ).to_dict()
    write_shared(workdir.summary, json.dumps(summary, indent=2))  # last: it says that everything above is written
    return summary


class _Loop:
    """The steps of one run from its restored state: logs every few steps, evaluates on dev and exports the
    best each epoch, checkpoints, and stops (checkpointed) on SIGTERM or SIGINT."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: Workdir, setup: training_setup.TrainingSetup,
        manager, state: steps.TrainState, progress: Progress, start_time: float,
    ):
        self.config, self.workdir, self.setup, self.manager, self.progress = config, workdir, setup, manager, progress
        self.task = setup.experiment.task
        self.step = int(state.step)
        self.p_state = steps.replicate(state)
        self.evaluator = evaluation.Evaluator(setup.experiment, config)
        self.writer = HistoryWriter(workdir, self.step)
        self.step_metrics = _StepMetrics(progress, config.on_nonfinite, manager.directory)
        self._earlier_wall_time, self._start_time = progress.wall_time_s, start_time
        self._window_start, self._window_steps = time.time(), 0  # what examples/s is measured over

    def wall_time_s(self) -> float:
        """This run's time so far, over every process that ran it."""
        return self._earlier_wall_time + time.time() - self._start_time

    def run(self, dev_data: dict) -> dict:
        """Trains to the last step; returns the dev results of the last step."""
        config, total_steps = self.config, self.setup.total_steps
        last_results: dict = {}
        # However the loop ends (done, a signal, a non-finite loss, an error), closing the manager completes
        # a checkpoint still being written in the background, which would otherwise stay a temporary folder.
        with StopSignals() as signals, _closing_checkpoints(self.manager), contextlib.closing(
            self.writer
        ), tqdm(total=total_steps, initial=self.step, disable=not is_primary_process(), desc=self.task.name,
                file=console()) as progress_bar:
            while self.step < total_steps:
                self.p_state, device_metrics = self.setup.p_train_step(
                    self.p_state, self.setup.p_frozen, next(self.setup.train_iter)
                )
                self.step += 1
                self._window_steps += 1
                self.step_metrics.add(self.step, device_metrics)
                if self.step % config.log_every_steps == 0 or self.step == total_steps:
                    self._log(progress_bar)
                progress_bar.update(1)
                checkpoint.raise_save_errors(self.manager)
                if self.step % self.setup.train_iter.steps_per_epoch == 0 or self.step == total_steps:
                    last_results = self._evaluate_and_export(dev_data)
                    self._save()
                    self._window_start, self._window_steps = time.time(), 0  # examples/s measures training alone
                elif self.step % config.checkpoint_every_steps == 0:
                    self._save()
                if signals.stop_requested(self.step, config.log_every_steps):
                    if self.progress.saved_step != self.step:  # else just saved above; orbax refuses a step twice
                        self._save(force=True)
                    raise Preempted(signals.received or signal.SIGTERM, self.step, self.workdir)
        if not last_results:  # resumed after the final step was already checkpointed
            last_results = self.evaluator.evaluate(self.p_state.params, self.setup.p_frozen, dev_data, self.task)
        return last_results

    def _log(self, progress_bar: tqdm) -> None:
        scalars = {
            "train/loss": self.step_metrics.window_loss(),
            # The update that made `step` ran at optax's count step - 1 (it counts from 0).
            "train/learning_rate": float(self.setup.schedule(self.step - 1)),
            "train/examples_per_second": (
                self._window_steps * self.config.global_batch_size / (time.time() - self._window_start)
            ),
            "train/skipped_steps": self.progress.skipped_steps,
        }
        self.writer.write(self.step, scalars)
        progress_bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/learning_rate']:.2e}",
                                 ex_per_s=f"{scalars['train/examples_per_second']:.1f}")
        self._window_start, self._window_steps = time.time(), 0

    def _save(self, force: bool = False) -> None:
        self.step_metrics.read()  # a non-finite step stops the run before anything after it is saved
        self.progress.wall_time_s = self.wall_time_s()
        with checkpoint.storage_deadline(self.config.storage_deadline_minutes,
                                         f"writing the metrics history of {self.workdir}"):
            self.writer.flush()  # the history up to the step saved, before the step is
        _save(self.manager, steps.unreplicate(self.p_state), self.progress, self.setup.train_iter.state(),
              self.config, force)

    def _evaluate_and_export(self, dev_data: dict) -> dict:
        self.step_metrics.read()  # nor evaluated or exported
        step, task = self.step, self.task
        results = self.evaluator.evaluate(self.p_state.params, self.setup.p_frozen, dev_data, task)
        self.writer.write(step, {f"{split}/{name}": value for split, r in results.items() for name, value in r.items()})
        logging.info("step %d dev %s", step, results)
        is_best = self.progress.record(step, metrics.main_score(task, results[task.dev_splits[0]]), results)
        # A checkpoint that failed in the background stops the run here, naming its cause, before the export
        # (which a full disk would fail too) or anything else is written.
        checkpoint.raise_save_errors(self.manager, wait=True)
        if is_best and is_primary_process():  # every host keeps the best score; one writes the export
            with checkpoint.storage_deadline(self.config.storage_deadline_minutes,
                                             f"writing the export {self.workdir.export_file}"):
                export.write(self.workdir.export_dir, steps.unreplicate(self.p_state.params),
                             export.metadata(self.setup.experiment))
        return results


@contextlib.contextmanager
def _closing_checkpoints(manager):
    """Closes `manager` however the loop ends; a failed background save is reported (as WriteFailed) only
    where the loop did not already stop on an error of its own."""
    try:
        yield
    except Preempted:
        checkpoint.close(manager)  # Preempted says the checkpoint is written; a failed write must say otherwise
        raise
    except BaseException:
        with contextlib.suppress(WriteFailed):  # the loop's own error is the one to report
            checkpoint.close(manager)
        raise
    checkpoint.close(manager)


def _run_result(
    config: ml_collections.ConfigDict, experiment: experiment_lib.Experiment, progress: Progress,
    last_results: dict, *, total_steps: int, steps_per_epoch: int, wall_time_s: float, parameter_summary: dict,
) -> RunResult:
    """What ran, and its best and last dev metrics."""
    task, spec = experiment.task, experiment.spec
    return RunResult(
        task=task.name,
        mode=spec.mode,
        model=spec.model,
        adapter_size=spec.adapter.size,
        learning_rate=config.learning_rate,
        # num_train_steps, when set, overrides the epochs.
        num_epochs=total_steps / steps_per_epoch if config.num_train_steps else config.num_epochs,
        num_train_steps=total_steps,
        seed=config.seed,
        top_k=spec.top_k,
        main_metric=task.main_metric,
        score=progress.best_score,
        best_step=progress.best_step,
        dev_metrics=_flat_dev_metrics(task, progress.best_metrics),
        all_dev_metrics=progress.best_metrics,
        final_dev_metrics=last_results,
        skipped_steps=progress.skipped_steps,
        wall_time_s=wall_time_s,
        **parameter_summary,
    )


def _flat_dev_metrics(task, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The main dev split's metrics, plus other dev splits' as '<split>/<metric>' (MNLI mismatched)."""
    flat = dict(results[task.dev_splits[0]])
    for split in task.dev_splits[1:]:
        flat.update({f"{split}/{name}": value for name, value in results[split].items()})
    return flat
