"""The adapter bank on the tiny model: a mixed batch scores every example as its task's own model does."""

import re

import jax
import numpy as np
import pytest

from adapter_jax import bank as bank_lib
from adapter_jax import errors, experiment, export, glue_data, weights

# name -> (GLUE task, mode, adapter size, adapter sites, train_pooler): both head kinds, three head
# sizes, two adapter sizes, an export without adapters, one with adapters at one site, pooler trained or not.
EXPORTS = {
    "rte": ("rte", "adapters", 8, ("attention", "output"), True),
    "stsb": ("stsb", "adapters", 4, ("attention", "output"), False),
    "mnli": ("mnli", "layernorm", 8, ("attention", "output"), True),
    "sst2": ("sst2", "adapters", 4, ("output",), False),
}
SENTENCES = ("the cat sleeps .", "a dog and a very large bird sleep on the old red chair today .", "fish swim .",
             "the horse , the cow and the lion are all asleep in the field by the river .")


def _base_config(model_dir):
    from configs import glue

    config = glue.get_config("rte")
    config.model = str(model_dir)
    config.max_seq_length = 32
    return config


def _write_export(model_dir, folder, task, mode, size, sites, train_pooler, seed):
    """An export whose trained parameters are the initial ones plus noise, so every one of them matters."""
    config = _base_config(model_dir)
    config.task, config.mode, config.adapter_size = task, mode, size
    config.adapter_sites, config.train_pooler, config.seed = sites, train_pooler, seed
    setup = experiment.build(config)
    rng = np.random.default_rng(seed)
    trained = jax.tree.map(
        lambda x: np.asarray(x) + rng.normal(0.0, 0.2, np.shape(x)).astype(np.float32), setup.trainable_params
    )
    return export.write(folder, trained, export.metadata(setup))


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        name: _write_export(tiny_model_dir, root / name, *settings, seed=seed)
        for seed, (name, settings) in enumerate(EXPORTS.items())
    }


@pytest.fixture(scope="module")
def bank(tiny_model_dir, exports):
    adapter_bank = bank_lib.AdapterBank(
        str(tiny_model_dir), capacity=6, max_adapter_size=8, max_seq_length=32, batch_sizes=(4, 16), buckets=(16, 32)
    )
    for name, path in exports.items():
        adapter_bank.load(name, path)
    return adapter_bank


def _examples(task_name, count):
    pair = task_name != "sst2"
    return [
        glue_data.Example(i, SENTENCES[i % 4], SENTENCES[(i + 1) % 4] if pair else None, None)
        for i in range(count)
    ]


def _own_model_logits(model_dir, path, dataset):
    """The logits of the export's own single-task model, as predict computes them."""
    setup = export.onto_base(export.read(path), _base_config(model_dir))
    mask = (np.arange(dataset.max_seq_length) < dataset.lengths[:, None]).astype(np.int32)
    return np.asarray(setup.model.apply({"params": setup.params}, dataset.input_ids, dataset.token_type_ids, mask))


def test_mixed_batch_equals_each_tasks_own_model(bank, exports, tiny_model_dir):
    parts = [(name, bank.tokenize(name, _examples(name, count))) for name, count in zip(EXPORTS, (5, 3, 6, 4))]
    mixed = bank.logits(parts)
    for (name, dataset), logits in zip(parts, mixed, strict=True):
        own = _own_model_logits(tiny_model_dir, exports[name], dataset)
        assert logits.shape == own.shape == (len(dataset), bank.slot(name).task.num_labels)
        np.testing.assert_allclose(logits, own, atol=1e-5, rtol=0, err_msg=name)


def _mixed_rows(bank):
    parts = [(name, bank.tokenize(name, _examples(name, 4))) for name in EXPORTS]
    names = [name for name, dataset in parts for _ in range(len(dataset))]
    columns = [np.concatenate([getattr(dataset, key) for _, dataset in parts])
               for key in ("input_ids", "token_type_ids", "lengths")]
    return names, columns


def test_example_order_changes_nothing(bank):
    names, columns = _mixed_rows(bank)
    logits = bank.mixed_logits(names, *columns)
    order = np.random.default_rng(0).permutation(len(names))
    shuffled = bank.mixed_logits([names[i] for i in order], *(column[order] for column in columns))
    np.testing.assert_allclose(shuffled, logits[order], atol=1e-6, rtol=0)


class _CompileCounter:
    """Counts XLA compilations while active."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_filling_and_replacing_slots_does_not_recompile(bank, tiny_model_dir, exports):
    adapter_bank = bank_lib.AdapterBank(
        str(tiny_model_dir), capacity=3, max_adapter_size=8, max_seq_length=32, batch_sizes=(4,), buckets=(32,)
    )
    adapter_bank.load("a", exports["rte"])
    adapter_bank.load("b", exports["mnli"])
    names, columns = _mixed_rows(bank)  # pairs of sentences, so any task can score them
    names = ["a" if i % 2 else "b" for i in range(len(names))]
    before = adapter_bank.mixed_logits(names, *columns)  # compiles the forward for this shape

    counter = _CompileCounter()
    adapter_bank.load("a", exports["stsb"])  # replace
    adapter_bank.load("c", exports["sst2"])  # fill the last free slot
    adapter_bank.remove("b")
    adapter_bank.load("b", exports["rte"])  # and refill a freed one
    counter.active = True
    after = adapter_bank.mixed_logits(names, *columns)
    counter.active = False
    assert counter.count == 0
    assert not np.allclose(before, after)
    assert adapter_bank.slot("a").task.name == "stsb" and adapter_bank.slot("c").index == 2

    with pytest.raises(errors.ConfigError, match="all 3 slots of the bank are taken"):
        adapter_bank.load("d", exports["rte"])
    with pytest.raises(errors.ConfigError, match="unknown task 'd'; loaded: a, c, b"):
        adapter_bank.mixed_logits(["d"], *columns)


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model's architecture with other weights."""
    config, params = weights.load_pretrained(tiny_model_dir)
    other = jax.tree.map(lambda x: x + 0.01, params)
    folder = tmp_path_factory.mktemp("other-base")
    return weights.export_pretrained(config, other, folder, tokenizer_dir=tiny_model_dir)


def test_refuses_another_base_model_naming_the_file(bank, other_base_dir, tmp_path):
    path = _write_export(other_base_dir, tmp_path / "export", "rte", "adapters", 8, ("attention", "output"), False, 0)
    with pytest.raises(errors.CheckpointError, match=f"adapter export {re.escape(str(path))} was trained on base"):
        bank.load("other", tmp_path)  # a training workdir names the export inside it


@pytest.mark.parametrize(
    "mode, size, message",
    [("adapters", 16, "has adapter size 16 and max_seq_length 32; this bank holds at most 8 and 32"),
     ("top_k", 8, "was trained in mode 'top_k'")],
)
def test_refuses_exports_the_bank_cannot_hold(bank, tiny_model_dir, tmp_path, mode, size, message):
    path = _write_export(tiny_model_dir, tmp_path, "rte", mode, size, ("attention", "output"), False, 0)
    with pytest.raises(errors.CheckpointError, match=f"adapter export {re.escape(str(path))} {re.escape(message)}"):
        bank.load("big", path)


def test_refuses_an_export_whose_arrays_do_not_fit_its_settings(bank, tiny_model_dir, exports, tmp_path):
    trained, settings = export.read_raw(exports["stsb"])
    settings["adapter"]["size"] = 8  # the arrays are size 4
    path = export.write(tmp_path, trained, settings)
    with pytest.raises(errors.CheckpointError, match=f"adapter export {re.escape(str(path))} does not match"):
        bank.load("bad", path)

