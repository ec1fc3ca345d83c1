"""Building a run from its config (or a loaded export's RunSpec): the task, the base model with adapters,
its parameters split by what trains, and the datasets."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from adapter_jax import glue_data, input_pipeline, tasks, trainable, weights
from adapter_jax.modeling import BertConfig, BertForSequenceClassification
from adapter_jax.run_spec import RunSpec


@dataclasses.dataclass
class Experiment:
    """Everything a config defines before training: task, model, and parameters split by the mask."""

    spec: RunSpec  # the run the model is built from: the config's, or a loaded export's
    task: tasks.Task
    model_dir: epath.Path
    bert_config: BertConfig
    model: BertForSequenceClassification
    trainable_mask: dict  # shaped like the parameters: True where a parameter trains
    trainable_params: dict
    frozen_params: dict
    base_fingerprint: str  # of the base model's weights (weights.fingerprint)

    @property
    def params(self) -> dict:
        return trainable.merge(self.trainable_params, self.frozen_params)

    def parameter_summary(self) -> dict[str, Any]:
        return trainable.parameter_summary(self.params, self.trainable_mask)


def model_for(spec: RunSpec, bert_config: BertConfig, dtype: str = "float32") -> BertForSequenceClassification:
    """BERT with the run's adapters and a head for its task."""
    return BertForSequenceClassification(
        config=bert_config, adapter=spec.adapter, num_labels=spec.num_labels, dtype=jnp.dtype(dtype)
    )


def trainable_shapes(spec: RunSpec, bert_config: BertConfig) -> dict:
    """The shapes (tuples) of the parameters the run trains on a base model of `bert_config`, built from
    abstract parameters alone."""
    shapes = weights.abstract_params(model_for(spec, bert_config))
    trained, _ = trainable.split(shapes, spec.trainable_mask(shapes, bert_config.num_hidden_layers))
    return jax.tree.map(lambda shape: tuple(shape.shape), trained)


def build(
    config: ml_collections.ConfigDict, model_folder: weights.ModelFolder | None = None, spec: RunSpec | None = None
) -> Experiment:
    """Loads the base model of config.model (from `model_folder` if already opened), adds the adapters and
    head of `spec` (default: the config's own run), and splits the parameters into trainable and frozen."""
    spec = spec or RunSpec.from_config(config)
    task = tasks.get_task(spec.task)
    model_folder = model_folder or weights.open_model_folder(config.model)
    bert_config, pretrained = weights.load_pretrained(model_folder)
    if config.dropout_rate >= 0:
        bert_config = dataclasses.replace(
            bert_config, hidden_dropout_prob=config.dropout_rate, attention_probs_dropout_prob=config.dropout_rate
        )
    model = model_for(spec, bert_config, config.dtype)
    params = weights.init_params(model, pretrained, jax.random.PRNGKey(config.seed))
    mask = spec.trainable_mask(params, bert_config.num_hidden_layers)
    trainable_params, frozen_params = trainable.split(params, mask)
    return Experiment(
        spec=spec,
        task=task,
        model_dir=epath.Path(model_folder.path),
        bert_config=bert_config,
        model=model,
        trainable_mask=mask,
        trainable_params=trainable_params,
        frozen_params=frozen_params,
        base_fingerprint=weights.fingerprint(pretrained),
    )


def load_dataset(
    config: ml_collections.ConfigDict, task: tasks.Task, split: str, tokenizer
) -> input_pipeline.TokenizedDataset:
    """One split of `task`, tokenized; the train split cut to config.max_train_examples if set."""
    examples = glue_data.read_examples(
        task,
        split,
        glue_dir=config.glue_dir,
        source=config.data_source,
        tfds_data_dir=config.tfds_data_dir or None,
    )
    if split == "train" and 0 < config.max_train_examples < len(examples):
        examples = [examples[i] for i in glue_data.train_subset_indices(len(examples), config.max_train_examples)]
    return input_pipeline.tokenize(task, examples, tokenizer, config.max_seq_length)


def load_dev_datasets(
    config: ml_collections.ConfigDict, task: tasks.Task, tokenizer
) -> dict[str, input_pipeline.TokenizedDataset]:
    """Every dev split of `task` (MNLI: matched and mismatched), tokenized, by split name."""
    return {split: load_dataset(config, task, split, tokenizer) for split in task.dev_splits}
