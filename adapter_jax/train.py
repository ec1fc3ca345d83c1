"""Training and evaluation: pure pmap steps and `train_and_evaluate(config, workdir)`.

The training step differentiates only the trainable subset of the parameters; frozen weights
enter the loss as constants, so XLA computes no weight gradients for them and the cross-device
mean (`lax.pmean`) carries only trainable gradients.
"""

import contextlib
import dataclasses
import functools
import json
import signal
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
from absl import logging
from etils import epath
from flax import jax_utils
from jax.experimental import multihost_utils
from tqdm import tqdm

from adapter_jax import checkpoint, input_pipeline, metrics, optim, submission, tasks, validation, weights
from adapter_jax.adapters import AdapterConfig
from adapter_jax.errors import CheckpointError
from adapter_jax.modeling import BertConfig, BertForSequenceClassification

AXIS = "devices"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the full parameter tree, frozen leaves included
    opt_state: optax.OptState
    rng: jax.Array


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the checkpoint of the current step is written."""

    def __init__(self, signum: int, step: int, workdir: epath.Path):
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written to "
            f"{workdir}. Rerun the same command to resume."
        )


class NonFiniteLoss(Exception):
    """Raised when a step's loss or gradient is not finite and the config says to stop."""


def per_example_loss(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
    if is_regression:
        return jnp.square(logits[..., 0] - labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: BertForSequenceClassification,
    tx: optax.GradientTransformation,
    labels: Mapping[str, Any],
    is_regression: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one device's shard of the batch; call under pmap(axis_name=AXIS).

    A step whose loss or gradient is not finite leaves parameters and optimizer state unchanged
    and reports finite=False; the host loop decides whether to stop or go on.
    """
    trainable, frozen = optim.partition(state.params, labels)
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))

    def loss_fn(trainable_params):
        logits = model.apply(
            {"params": optim.merge(trainable_params, frozen)},
            batch["input_ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            deterministic=False,
            rngs={"dropout": dropout_rng},
        )
        losses = per_example_loss(logits, batch["label"], is_regression)
        return jnp.sum(losses * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    loss, grads = jax.lax.pmean((loss, grads), AXIS)
    # The optimizer spans the full tree so frozen leaves go through set_to_zero; their zero
    # gradients are constants that XLA drops, as it drops the unused frozen "updates".
    full_grads = optim.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    trainable_updates, _ = optim.partition(updates, labels)
    new_trainable = optax.apply_updates(trainable, trainable_updates)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        step=state.step + 1,
        params=optim.merge(keep_if_finite(new_trainable, trainable), frozen),
        opt_state=keep_if_finite(opt_state, state.opt_state),
    )
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def replicate(tree: Any) -> Any:
    """Copies `tree` to every local device laid out as pmap's own outputs are.

    flax's jax_utils.replicate lays arrays out on another mesh, which under JAX's shard_map-based
    pmap makes the second training step compile the whole program again.
    """
    count = jax.local_device_count()
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))), tree)
    return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def initial_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1),  # 0 initialised the parameters
    )


def pmapped_train_step(setup: "Setup", tx: optax.GradientTransformation, devices=None):
    """`train_step` for this model and optimizer, pmapped over `devices` (all local ones by default)."""
    return jax.pmap(
        functools.partial(
            train_step, model=setup.model, tx=tx, labels=setup.labels, is_regression=setup.task.is_regression
        ),
        axis_name=AXIS,
        donate_argnums=(0,),
        devices=devices,
    )


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, model: BertForSequenceClassification) -> jax.Array:
    """Logits for one device's shard of an evaluation batch."""
    return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


@dataclasses.dataclass
class Setup:
    """Everything built from a config before training: task, model, parameters and what trains."""

    task: tasks.Task
    model_dir: epath.Path
    bert_config: BertConfig
    model: BertForSequenceClassification
    params: dict
    labels: dict
    base_fingerprint: str

    @property
    def trainable_params(self) -> dict:
        return optim.partition(self.params, self.labels)[0]


def adapter_config(config: ml_collections.ConfigDict) -> AdapterConfig:
    size = config.adapter_size if config.mode == "adapters" else 0
    return AdapterConfig(
        size=size,
        init_std=config.adapter_init_std,
        sites=tuple(config.adapter_sites),
        layers=tuple(config.adapter_layers) or None,
    )


def build(config: ml_collections.ConfigDict) -> Setup:
    """Loads the base model, builds the classifier with adapters and labels what trains."""
    task = tasks.get_task(config.task)
    model_dir = weights.resolve_model_dir(config.model)
    bert_config, pretrained = weights.load_pretrained(model_dir)
    if config.dropout_rate >= 0:
        bert_config = dataclasses.replace(
            bert_config, hidden_dropout_prob=config.dropout_rate, attention_probs_dropout_prob=config.dropout_rate
        )
    model = BertForSequenceClassification(
        config=bert_config,
        adapter=adapter_config(config),
        num_labels=task.num_labels,
        dtype=jnp.dtype(config.dtype),
    )
    params = weights.init_params(model, pretrained, jax.random.PRNGKey(config.seed))
    labels = optim.trainable_labels(
        params,
        mode=config.mode,
        num_layers=bert_config.num_hidden_layers,
        top_k=config.top_k,
        train_pooler=config.train_pooler,
    )
    return Setup(task, epath.Path(model_dir), bert_config, model, params, labels, checkpoint.fingerprint(pretrained))


def load_dataset(config: ml_collections.ConfigDict, task: tasks.Task, split: str, tokenizer) -> input_pipeline.TokenizedDataset:
    examples = input_pipeline.read_examples(
        task,
        split,
        glue_dir=config.glue_dir,
        source=config.data_source,
        tfds_data_dir=config.tfds_data_dir or None,
    )
    if split == "train" and 0 < config.max_train_examples < len(examples):
        examples = [examples[i] for i in train_subset_indices(len(examples), config.max_train_examples)]
    return input_pipeline.tokenize(examples, tokenizer, config.max_seq_length)


def train_subset_indices(num_examples: int, subset_size: int) -> np.ndarray:
    """A fixed subset (seed 0, not the run's seed), in file order, so every run of a sweep sees the same data."""
    return np.sort(np.random.default_rng(0).permutation(num_examples)[:subset_size])


def predict_dataset(
    p_eval_step, params: Any, dataset: input_pipeline.TokenizedDataset, config: ml_collections.ConfigDict
) -> np.ndarray:
    """Logits for every example of `dataset`, in dataset order, on every host."""
    outputs = np.zeros((len(dataset), params_num_labels(params)), np.float32)
    for batch in input_pipeline.eval_batches(
        dataset,
        global_batch_size=config.eval_batch_size,
        num_devices=jax.local_device_count(),
        buckets=tuple(config.buckets),
    ):
        logits, rows, weight = np.asarray(p_eval_step(params, batch)), batch["idx"], batch["weight"]
        if jax.process_count() > 1:  # each host scored its slice of the batch; every host needs all rows
            logits, rows, weight = multihost_utils.process_allgather((logits, rows, weight))
        real = weight.reshape(-1) > 0
        outputs[rows.reshape(-1)[real]] = logits.reshape(-1, logits.shape[-1])[real]
    return outputs


def params_num_labels(params: Any) -> int:
    return params["classifier"]["bias"].shape[-1]


def to_predictions(outputs: np.ndarray, task: tasks.Task) -> np.ndarray:
    return outputs[:, 0] if task.is_regression else outputs.argmax(-1)


def evaluate(
    p_eval_step, params: Any, datasets: Mapping[str, input_pipeline.TokenizedDataset], task: tasks.Task, config
) -> dict[str, dict[str, float]]:
    """The task's metrics on each labelled split, e.g. {'dev': {'accuracy': 0.71}}."""
    results = {}
    for split, dataset in datasets.items():
        predictions = to_predictions(predict_dataset(p_eval_step, params, dataset, config), task)
        results[split] = metrics.compute_metrics(task, predictions, dataset.labels)
    return results


class MetricWriter:
    """Scalars to TensorBoard event files and a JSON-lines log in the workdir (process 0 only).

    The JSON-lines file is rewritten whole rather than appended to, since object stores such as
    gs:// cannot append; earlier lines (of a run that resumed) are kept.
    """

    def __init__(self, workdir: epath.Path):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            self._tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = workdir / "metrics.jsonl"
            self._lines = self._jsonl.read_text().splitlines() if self._jsonl.exists() else []

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._lines.append(json.dumps({"step": step, **scalars}))
        self._jsonl.write_text("\n".join(self._lines) + "\n")

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()


class _StopSignals:
    """Turns SIGTERM (sent before a TPU VM is preempted) and SIGINT into a flag the loop polls."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def stop_requested(self, step: int, every_steps: int) -> bool:
        """Whether to stop after `step`. On a pod, all hosts must save the same step, so they agree
        every `every_steps` steps: a signal that reached any host stops them all."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % every_steps:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.received is not None)).any())

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def export_metadata(config: ml_collections.ConfigDict, setup: Setup) -> dict:
    """What an adapter export must say so that it can be checked against a base model and reloaded."""
    return {
        "format": 1,
        "task": setup.task.name,
        "model": config.model,
        "base_fingerprint": setup.base_fingerprint,
        "bert_config": dataclasses.asdict(setup.bert_config),
        "adapter": dataclasses.asdict(adapter_config(config)),
        "mode": config.mode,
        "top_k": config.top_k,
        "train_pooler": config.train_pooler,
        "num_labels": setup.task.num_labels,
        "max_seq_length": config.max_seq_length,
    }


def load_export_onto_base(config: ml_collections.ConfigDict, export_path: epath.PathLike) -> tuple[Setup, dict]:
    """Base model from `config` + trained parameters from an export; refuses a mismatched base."""
    trained, metadata = checkpoint.load_adapters(export_path)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.task = metadata["task"]
        config.mode = metadata["mode"]
        config.top_k = metadata["top_k"]
        config.train_pooler = metadata["train_pooler"]
        config.adapter_size = metadata["adapter"]["size"] or config.adapter_size
        config.adapter_init_std = metadata["adapter"]["init_std"]
        config.adapter_sites = tuple(metadata["adapter"]["sites"])
        config.adapter_layers = tuple(metadata["adapter"]["layers"] or ())
    setup = build(config)
    if metadata["base_fingerprint"] != setup.base_fingerprint:
        raise CheckpointError(
            f"adapter export {export_path} was trained on base model {metadata['model']!r} "
            f"(weights sha256 {metadata['base_fingerprint'][:12]}...), but {config.model!r} has weights "
            f"sha256 {setup.base_fingerprint[:12]}...; load it onto the base it was trained on"
        )
    expected = jax.tree.map(np.shape, setup.trainable_params)
    found = jax.tree.map(np.shape, trained)
    if expected != found:
        raise CheckpointError(
            f"adapter export {export_path} does not match the model built from its settings: "
            f"expected parameter shapes {expected}, found {found}"
        )
    setup.params = optim.merge(optim.partition(setup.params, setup.labels)[1], trained)
    return setup, metadata


def _checkpointable(state: TrainState, labels: Mapping[str, Any]) -> dict:
    """The part of the state a checkpoint keeps: frozen weights are rebuilt from the base model."""
    return {
        "step": state.step,
        "params": optim.partition(state.params, labels)[0],
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def parameter_summary(setup: Setup) -> dict[str, Any]:
    """Parameter counts; the fraction is trained parameters per task over the base model's, as in the paper."""
    total, trainable = optim.count_parameters(setup.params, setup.labels)
    added = [  # what the task adds to the base model: adapters and head
        leaf for path, leaf in flax.traverse_util.flatten_dict(setup.params).items()
        if "adapter" in path or path[0] == "classifier"
    ]
    base = total - sum(int(np.prod(np.shape(leaf))) for leaf in added)
    return {
        "total_params": total,
        "base_params": base,
        "trainable_params": trainable,
        "trainable_fraction": trainable / base,
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains on the task's train split, evaluates on dev every epoch, checkpoints, and resumes.

    Returns (and writes to <workdir>/summary.json) the best-on-dev metrics and run facts. The
    best-on-dev trained parameters are exported to <workdir>/export/adapters.safetensors.
    """
    start_time = time.time()
    validation.validate_config(config, workdir)
    workdir = epath.Path(workdir)
    setup = build(config)
    task = setup.task
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    train_data = load_dataset(config, task, "train", tokenizer)
    dev_data = {split: load_dataset(config, task, split, tokenizer) for split in task.dev_splits}
    train_iter = input_pipeline.TrainIterator(
        train_data,
        global_batch_size=config.global_batch_size,
        num_devices=jax.local_device_count(),
        seed=config.seed,
        buckets=tuple(config.buckets),
    )
    steps_per_epoch = train_iter.steps_per_epoch
    total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    optimizer_settings = dict(
        learning_rate=config.learning_rate,
        total_steps=total_steps,
        warmup_fraction=config.warmup_fraction,
    )
    tx = optim.create_optimizer(
        setup.labels,
        **optimizer_settings,
        weight_decay=config.weight_decay,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
    )
    schedule = optim.learning_rate_schedule(**optimizer_settings)
    state = initial_state(setup.params, tx, config.seed)

    manager = checkpoint.checkpoint_manager(workdir / "checkpoints", max_to_keep=config.checkpoints_to_keep)
    best = {"score": -float("inf"), "step": 0, "metrics": {}}
    previous_wall_time = 0.0
    skipped_steps = 0
    last_finite_loss = float("nan")
    restored = checkpoint.restore_checkpoint(manager, _checkpointable(state, setup.labels))
    if restored is not None:
        saved, meta = restored
        state = state.replace(
            step=saved["step"],
            params=optim.merge(optim.partition(state.params, setup.labels)[1], saved["params"]),
            opt_state=saved["opt_state"],
            rng=saved["rng"],
        )
        train_iter.restore(meta["data"])
        best = meta["best"]
        previous_wall_time = meta["wall_time_s"]
        skipped_steps = meta.get("skipped_steps", 0)
        last_finite_loss = meta.get("last_finite_loss", float("nan"))
        logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))

    p_train_step = pmapped_train_step(setup, tx)
    p_eval_step = jax.pmap(functools.partial(eval_step, model=setup.model), axis_name=AXIS)
    p_state = replicate(state)
    step = int(state.step)
    writer = MetricWriter(workdir)
    pending: list[tuple[int, dict]] = []  # device metrics not yet read, so the host does not wait each step
    saved_step = step  # the step of the latest checkpoint (or 0)
    window_losses: list[float] = []  # finite losses since the last log line

    def flush_metrics() -> None:
        nonlocal skipped_steps, last_finite_loss
        for at_step, device_metrics in jax.device_get(pending):
            step_metrics = jax.tree.map(lambda x: x[0].item(), device_metrics)
            if step_metrics["finite"]:
                last_finite_loss = step_metrics["loss"]
                window_losses.append(last_finite_loss)
                continue
            if config.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {at_step} (loss {step_metrics['loss']}, "
                    f"gradient norm {step_metrics['grad_norm']}); last finite loss {last_finite_loss:.6g}. "
                    f"The last checkpoint in {manager.directory} is kept; lower the learning rate or "
                    f"set --config.on_nonfinite=skip."
                )
            skipped_steps += 1
        pending.clear()

    def save(force: bool = False) -> None:
        nonlocal saved_step
        flush_metrics()
        host_state = jax.device_get(jax_utils.unreplicate(_checkpointable(p_state, setup.labels)))
        meta = {
            "data": train_iter.state(),
            "best": best,
            "wall_time_s": previous_wall_time + time.time() - start_time,
            "config": config.to_dict(),
            "skipped_steps": skipped_steps,  # so that a resumed run's summary counts them all
            "last_finite_loss": last_finite_loss,
        }
        checkpoint.save_checkpoint(manager, step, host_state, meta, force=force)
        saved_step = step

    def evaluate_and_keep_best() -> dict:
        nonlocal best
        results = evaluate(p_eval_step, p_state.params, dev_data, task, config)
        score = metrics.main_score(task, results[task.dev_splits[0]])
        writer.write(step, {f"{split}/{name}": value for split, r in results.items() for name, value in r.items()})
        logging.info("step %d dev %s", step, results)
        if score > best["score"]:
            best = {"score": score, "step": step, "metrics": results}
            trained = jax.device_get(jax_utils.unreplicate(optim.partition(p_state.params, setup.labels)[0]))
            checkpoint.export_adapters(workdir / "export", trained, export_metadata(config, setup))
        return results

    last_results: dict = {}
    window_start, window_steps = time.time(), 0
    # However the loop ends (done, a signal, a non-finite loss, an error), closing the manager completes
    # a checkpoint still being written in the background, which would otherwise stay a temporary folder.
    with _StopSignals() as signals, contextlib.closing(manager), contextlib.closing(writer), tqdm(
        total=total_steps, initial=step, disable=jax.process_index() != 0, desc=task.name
    ) as progress:
        while step < total_steps:
            batch = next(train_iter)
            p_state, device_metrics = p_train_step(p_state, batch)
            step += 1
            window_steps += 1
            pending.append((step, device_metrics))
            if step % config.log_every_steps == 0 or step == total_steps:
                flush_metrics()
                examples_per_second = window_steps * config.global_batch_size / (time.time() - window_start)
                scalars = {
                    "train/loss": float(np.mean(window_losses)) if window_losses else last_finite_loss,
                    "train/learning_rate": float(schedule(step)),
                    "train/examples_per_second": examples_per_second,
                    "train/skipped_steps": skipped_steps,
                }
                writer.write(step, scalars)
                progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/learning_rate']:.2e}",
                                     ex_per_s=f"{examples_per_second:.1f}")
                window_start, window_steps = time.time(), 0
                window_losses.clear()
            progress.update(1)
            if step % steps_per_epoch == 0 or step == total_steps:
                flush_metrics()  # a non-finite step stops the run before it evaluates and exports
                last_results = evaluate_and_keep_best()
                save()
                window_start, window_steps = time.time(), 0  # examples/s measures training alone
            elif step % config.checkpoint_every_steps == 0:
                save()
            if signals.stop_requested(step, config.log_every_steps):
                if saved_step != step:  # else just saved above, and orbax refuses to save a step twice
                    save(force=True)
                raise Preempted(signals.received or signal.SIGTERM, step, workdir)
    if not last_results:  # resumed after the final step was already checkpointed
        last_results = evaluate(p_eval_step, p_state.params, dev_data, task, config)

    summary = {
        "task": task.name,
        "mode": config.mode,
        "model": config.model,
        "adapter_size": adapter_config(config).size,
        "learning_rate": config.learning_rate,
        "num_epochs": config.num_epochs,
        "num_train_steps": total_steps,
        "seed": config.seed,
        "top_k": config.top_k,
        "main_metric": task.main_metric,
        "score": best["score"],
        "best_step": best["step"],
        "dev_metrics": _flat_dev_metrics(task, best["metrics"]),
        "all_dev_metrics": best["metrics"],
        "final_dev_metrics": last_results,
        "skipped_steps": skipped_steps,
        "wall_time_s": previous_wall_time + time.time() - start_time,
        **parameter_summary(setup),
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _flat_dev_metrics(task: tasks.Task, results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The main dev split's metrics, plus other dev splits' as '<split>/<metric>' (MNLI mismatched)."""
    flat = dict(results[task.dev_splits[0]])
    for split in task.dev_splits[1:]:
        flat.update({f"{split}/{name}": value for name, value in results[split].items()})
    return flat


def predict(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Loads base model + <workdir>/export, scores dev, and writes GLUE submission files for test.

    For MNLI the diagnostic set (AX) is predicted too, as GLUE asks.
    """
    validation.validate_config(config, training=False)
    workdir = epath.Path(workdir)
    setup, _ = load_export_onto_base(config, workdir / "export")
    tokenizer = input_pipeline.load_tokenizer(setup.model_dir)
    p_eval_step = jax.pmap(functools.partial(eval_step, model=setup.model), axis_name=AXIS)
    params = replicate(setup.params)
    dev_data = {split: load_dataset(config, setup.task, split, tokenizer) for split in setup.task.dev_splits}
    dev_results = evaluate(p_eval_step, params, dev_data, setup.task, config)
    prediction_tasks = [setup.task] + ([tasks.get_task("ax")] if setup.task.name == "mnli" else [])
    files = []
    for task in prediction_tasks:
        for split in task.test_splits:
            dataset = load_dataset(config, task, split, tokenizer)
            predictions = to_predictions(predict_dataset(p_eval_step, params, dataset, config), setup.task)
            files.append(
                str(submission.write_submission(task, split, dataset.idx, predictions, workdir / "submission"))
            )
    return {"dev_metrics": dev_results, "submission_files": files}
