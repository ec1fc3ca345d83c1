"""The training loop: `train_and_evaluate(config, workdir)`.

config -> experiment.build (model, parameters split by trainable.py's mask) -> steps.train_step
(pmapped) -> checkpoint (orbax, every few steps and each epoch) -> evaluation on dev each epoch ->
export (the best-on-dev trained parameters) -> summary.json.
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
    evaluation,
    export,
    input_pipeline,
    metrics,
    optim,
    run_utils,
    steps,
    validation,
)
from adapter_jax import experiment as experiment_lib
from adapter_jax.errors import CheckpointError, NonFiniteLoss, Preempted, WriteFailed
from adapter_jax.results import RunResult

SUMMARY_FILE = "summary.json"


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
    workdir = epath.Path(workdir)
    model_folder = validation.validate_config(config, workdir)
    with run_utils.WorkdirLock(workdir):
        return _train_and_evaluate(config, workdir, model_folder, start_time)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: epath.Path, model_folder, start_time: float
) -> dict[str, Any]:
    experiment = experiment_lib.build(config, model_folder)
    task = experiment.task
    tokenizer = input_pipeline.load_tokenizer(experiment.model_dir)
    train_data = experiment_lib.load_dataset(config, task, "train", tokenizer)
    dev_data = {split: experiment_lib.load_dataset(config, task, split, tokenizer) for split in task.dev_splits}
    train_iter = input_pipeline.TrainIterator(
        train_data,
        global_batch_size=config.global_batch_size,
        num_devices=jax.local_device_count(),
        seed=config.seed,
        buckets=tuple(config.buckets),
        packing=config.packing,
    )
    total_steps = config.num_train_steps or config.num_epochs * train_iter.steps_per_epoch
    schedule_settings = {
        "learning_rate": config.learning_rate,
        "total_steps": total_steps,
        "warmup_fraction": config.warmup_fraction,
    }
    schedule = optim.learning_rate_schedule(**schedule_settings)
    tx = optim.create_optimizer(
        **schedule_settings,
        weight_decay=config.weight_decay,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
    )
    manager = checkpoint.checkpoint_manager(workdir, max_to_keep=config.checkpoints_to_keep)
    state, progress, data_position = _restore(manager, steps.initial_state(experiment.trainable_params, tx, config.seed))
    if data_position is not None:
        train_iter.restore(data_position)
    earlier_wall_time = progress.wall_time_s

    p_train_step = steps.pmapped_train_step(experiment.model, tx, task.is_regression)
    evaluator = evaluation.Evaluator(experiment, config)
    p_state, p_frozen = steps.replicate(state), steps.replicate(experiment.frozen_params)
    parameter_summary = experiment.parameter_summary()
    # The steps read the devices' copy of the frozen weights; the host's would only double their memory.
    experiment = dataclasses.replace(experiment, frozen_params=None)
    step = int(state.step)
    if jax.process_index() == 0 and not (workdir / run_utils.CONFIG_FILE).exists():
        # What validation compares a rerun with when the history has no checkpoint beside it.
        run_utils.write_atomic(workdir / run_utils.CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
    writer = run_utils.MetricWriter(workdir, step)
    step_metrics = _StepMetrics(progress, config.on_nonfinite, manager.directory)

    def save(force: bool = False) -> None:
        step_metrics.read()  # a non-finite step stops the run before anything after it is saved
        progress.wall_time_s = earlier_wall_time + time.time() - start_time
        writer.flush()  # the history up to the step saved, before the step is
        _save(manager, steps.unreplicate(p_state), progress, train_iter.state(), config, force)

    def evaluate_and_export() -> dict:
        step_metrics.read()  # nor evaluated or exported
        results = evaluator.evaluate(p_state.params, p_frozen, dev_data, task)
        writer.write(step, {f"{split}/{name}": value for split, r in results.items() for name, value in r.items()})
        logging.info("step %d dev %s", step, results)
        is_best = progress.record(step, metrics.main_score(task, results[task.dev_splits[0]]), results)
        if is_best and jax.process_index() == 0:  # every host keeps the best score; one writes the export
            export.write(workdir / export.EXPORT_DIR, steps.unreplicate(p_state.params),
                         export.metadata(experiment))
        return results

    last_results: dict = {}
    window_start, window_steps = time.time(), 0
    # However the loop ends (done, a signal, a non-finite loss, an error), closing the manager completes
    # a checkpoint still being written in the background, which would otherwise stay a temporary folder.
    with run_utils.StopSignals() as signals, _closing_checkpoints(manager), contextlib.closing(writer), tqdm(
        total=total_steps, initial=step, disable=jax.process_index() != 0, desc=task.name, file=run_utils.console()
    ) as progress_bar:
        while step < total_steps:
            p_state, device_metrics = p_train_step(p_state, p_frozen, next(train_iter))
            step += 1
            window_steps += 1
            step_metrics.add(step, device_metrics)
            if step % config.log_every_steps == 0 or step == total_steps:
                scalars = {
                    "train/loss": step_metrics.window_loss(),
                    "train/learning_rate": float(schedule(step)),
                    "train/examples_per_second": window_steps * config.global_batch_size / (time.time() - window_start),
                    "train/skipped_steps": progress.skipped_steps,
                }
                writer.write(step, scalars)
                progress_bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/learning_rate']:.2e}",
                                         ex_per_s=f"{scalars['train/examples_per_second']:.1f}")
                window_start, window_steps = time.time(), 0
            progress_bar.update(1)
            checkpoint.raise_save_errors(manager)
            if step % train_iter.steps_per_epoch == 0 or step == total_steps:
                last_results = evaluate_and_export()
                save()
                window_start, window_steps = time.time(), 0  # examples/s measures training alone
            elif step % config.checkpoint_every_steps == 0:
                save()
            if signals.stop_requested(step, config.log_every_steps):
                if progress.saved_step != step:  # else just saved above, and orbax refuses to save a step twice
                    save(force=True)
                raise Preempted(signals.received or signal.SIGTERM, step, workdir)
    if not last_results:  # resumed after the final step was already checkpointed
        last_results = evaluator.evaluate(p_state.params, p_frozen, dev_data, task)

    summary = _run_result(
        config, experiment, progress, last_results, total_steps=total_steps,
        steps_per_epoch=train_iter.steps_per_epoch, wall_time_s=earlier_wall_time + time.time() - start_time,
        parameter_summary=parameter_summary,
    ).to_dict()
    if jax.process_index() == 0:  # last: a summary says that everything above is written
        run_utils.write_atomic(workdir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


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
