"""Readers on the real GLUE files and synthetic MRPC/STS-B folders, TFDS parity, tokenization,
bucketing, packing, resumable training batches, host sharding, exhaustive evaluation batches, and the
padded-token fraction and compiled shapes of real SST-2 and RTE epochs."""

import collections
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_jax import benchmarking, errors, glue_data, input_pipeline, tasks
from adapter_jax.glue_data import Example

# Official GLUE sizes, as listed in the data folder's README.
ROW_COUNTS = [
    ("cola", "train", 8551),
    ("cola", "dev", 1043),
    ("cola", "test", 1063),
    ("sst2", "train", 67349),
    ("sst2", "dev", 872),
    ("sst2", "test", 1821),
    ("rte", "train", 2490),
    ("rte", "dev", 277),
    ("rte", "test", 3000),
    ("wnli", "train", 635),
    ("wnli", "dev", 71),
    ("wnli", "test", 146),
    ("qnli", "dev", 5463),
    ("qnli", "test", 5463),
    ("ax", "test", 1104),
]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return input_pipeline.load_tokenizer(minilm_dir)


# --- Real GLUE files --------------------------------------------------------------------------


@pytest.mark.parametrize("name, split, count", ROW_COUNTS, ids=[f"{n}-{s}" for n, s, _ in ROW_COUNTS])
def test_real_split_loads_with_official_size(glue_dir, name, split, count):
    task = tasks.get_task(name)
    examples = glue_data.read_examples(task, split, glue_dir=glue_dir)
    assert len(examples) == count
    assert all(isinstance(e.text_a, str) and e.text_a for e in examples)
    assert all((e.text_b is not None) == (len(task.text_columns) == 2) for e in examples)
    if split.startswith("test"):
        assert all(e.label is None for e in examples)
        assert [e.idx for e in examples] == list(range(count))  # the files' `index` column
    else:
        assert {e.label for e in examples} == set(range(task.num_labels))


def test_qnli_dev_label_counts_and_quotes_kept(glue_dir):
    task = tasks.get_task("qnli")
    examples = glue_data.read_examples(task, "dev", glue_dir=glue_dir)
    counts = collections.Counter(task.labels[e.label] for e in examples)
    assert counts == {"entailment": 2702, "not_entailment": 2761}
    # Row 694 opens its passage with a quote; a CSV reader would strip it or merge rows.
    assert examples[694].text_b.startswith('"')


def test_cola_headerless_train_reads_sentence_and_label(glue_dir):
    examples = glue_data.read_examples(tasks.get_task("cola"), "train", glue_dir=glue_dir)
    first = examples[0]
    assert first == Example(0, "Our friends won't buy this analysis, let alone the next one we propose.", None, 1)


# --- Synthetic MRPC and STS-B folders (not shipped in the data folder) -------------------------


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_synthetic_mrpc_format(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    write(tmp_path / "MRPC" / "train.tsv", [header, '1\t11\t12\tHe said "yes".\tHe agreed.', "0\t13\t14\tA cat.\tA dog."])
    write(tmp_path / "MRPC" / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "7\t1\t2\tOne.\tTwo."])
    task = tasks.get_task("mrpc")
    assert glue_data.read_examples(task, "train", glue_dir=tmp_path) == [
        Example(0, 'He said "yes".', "He agreed.", 1),
        Example(1, "A cat.", "A dog.", 0),
    ]
    assert glue_data.read_examples(task, "test", glue_dir=tmp_path) == [Example(7, "One.", "Two.", None)]


def test_synthetic_stsb_format(tmp_path):
    columns = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    write(
        tmp_path / "STS-B" / "dev.tsv",
        [columns + "\tscore", "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA person.\t4.750"],
    )
    write(tmp_path / "STS-B" / "test.tsv", [columns, "0\tmain-news\tx\t2016\t0\tnone\tnone\tUp.\tDown."])
    task = tasks.get_task("stsb")
    (dev,) = glue_data.read_examples(task, "dev", glue_dir=tmp_path)
    assert dev == Example(0, "A man.", "A person.", 4.75) and isinstance(dev.label, float)
    assert glue_data.read_examples(task, "test", glue_dir=tmp_path) == [Example(0, "Up.", "Down.", None)]


# --- Bad input ---------------------------------------------------------------------------------


def test_missing_folder_names_path_and_task(tmp_path):
    with pytest.raises(errors.DataError) as raised:
        glue_data.read_examples(tasks.get_task("rte"), "train", glue_dir=tmp_path)
    assert str(tmp_path / "RTE" / "train.tsv") in str(raised.value) and "'rte'" in str(raised.value)


def test_missing_file_names_path_and_task(tmp_path):
    write(tmp_path / "WNLI" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1"])
    with pytest.raises(errors.DataError, match=f"'wnli'.*{tmp_path / 'WNLI' / 'dev.tsv'}"):
        glue_data.read_examples(tasks.get_task("wnli"), "dev", glue_dir=tmp_path)


def test_wrong_field_count_names_file_and_line(tmp_path):
    path = tmp_path / "RTE" / "dev.tsv"
    write(path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb"])
    with pytest.raises(errors.DataError, match=f"{path}:3: expected 4 tab-separated fields, found 3"):
        glue_data.read_examples(tasks.get_task("rte"), "dev", glue_dir=tmp_path)


def test_unknown_label_names_file_and_line(tmp_path):
    path = tmp_path / "CoLA" / "train.tsv"  # no header: line numbers count from the first row
    write(path, ["gj04\t1\t\tGood.", "gj04\t2\t*\tBad."])
    with pytest.raises(errors.DataError, match=f"{path}:2: unknown label '2'"):
        glue_data.read_examples(tasks.get_task("cola"), "train", glue_dir=tmp_path)


def test_bad_regression_label_names_file_and_line(tmp_path):
    columns = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    path = tmp_path / "STS-B" / "train.tsv"
    write(path, [columns, "0\tg\tf\ty\t0\ts\ts\tA.\tB.\thigh"])
    with pytest.raises(errors.DataError, match=f"{path}:2: bad regression label 'high'"):
        glue_data.read_examples(tasks.get_task("stsb"), "train", glue_dir=tmp_path)


@pytest.mark.parametrize(
    "name, folder, lines", [("sst2", "SST-2", ["sentence\tlabel"]), ("sst2", "SST-2", []), ("cola", "CoLA", [])]
)
def test_empty_split_is_an_error(tmp_path, name, folder, lines):
    write(tmp_path / folder / "dev.tsv", lines)
    with pytest.raises(errors.DataError, match=f"{tmp_path / folder / 'dev.tsv'}: no examples"):
        glue_data.read_examples(tasks.get_task(name), "dev", glue_dir=tmp_path)


def test_missing_column_names_file_and_column(tmp_path):
    write(tmp_path / "RTE" / "test.tsv", ["id\tsentence1\tsentence2", "0\ta\tb"])
    with pytest.raises(errors.DataError, match="test.tsv: no column 'index'"):
        glue_data.read_examples(tasks.get_task("rte"), "test", glue_dir=tmp_path)


def test_unknown_split_lists_splits(tmp_path):
    with pytest.raises(errors.ConfigError, match="dev_matched"):
        glue_data.read_examples(tasks.get_task("mnli"), "dev", glue_dir=tmp_path)


# --- TFDS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, split", [("rte", "dev"), ("stsb", "train"), ("cola", "test"), ("mnli", "dev_mismatched")])
def test_tfds_source_yields_the_tsv_fields(glue_dir, tmp_path, name, split):
    tfds = pytest.importorskip("tensorflow_datasets")
    task = tasks.get_task(name)
    with tfds.testing.mock_data(num_examples=6):
        examples = glue_data.read_examples(task, split, source="tfds")
    assert len(examples) == 6
    assert [e.idx for e in examples] == sorted(e.idx for e in examples)
    for e in examples:
        assert type(e.idx) is int and type(e.text_a) is str
        assert (e.text_b is not None) == (len(task.text_columns) == 2)
        if split.startswith("test"):
            assert e.label is None
        elif task.is_regression:
            assert type(e.label) is float
        else:
            assert type(e.label) is int and 0 <= e.label < task.num_labels

    # The same Python types as the TSV reader gives for RTE.
    tsv = glue_data.read_examples(tasks.get_task("rte"), "dev", glue_dir=glue_dir)[0]
    assert [type(getattr(tsv, f)) for f in ("idx", "text_a", "text_b", "label")] == [int, str, str, int]


def test_tfds_source_without_prepared_data_names_dataset_and_dir(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(errors.DataError, match=f"glue/rte \\(task 'rte', split 'validation'\\).*{tmp_path}"):
        glue_data.read_examples(tasks.get_task("rte"), "dev", source="tfds", tfds_data_dir=tmp_path)


# --- Tokenization ------------------------------------------------------------------------------


def bert_truncate_pair(tokens_a, tokens_b, max_length):
    """BERT run_classifier._truncate_seq_pair: drop from the longer sequence, one token at a time."""
    tokens_a, tokens_b = list(tokens_a), list(tokens_b)
    while len(tokens_a) + len(tokens_b) > max_length:
        (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()
    return tokens_a, tokens_b


def test_train_subset_is_fixed_in_file_order_and_grows_by_adding():
    subset = glue_data.train_subset_indices(20, 5)
    assert subset.tolist() == [2, 4, 6, 13, 19]  # what every sweep so far trained on: it must not change
    assert glue_data.train_subset_indices(67349, 5000)[:5].tolist() == [0, 25, 49, 60, 66]  # SST-2, 5,000
    assert set(subset) <= set(glue_data.train_subset_indices(20, 10))


def test_tokenize_pairs_like_bert(tokenizer):
    a = "the quick brown fox jumps over the lazy dog near the river bank today"
    b = "a dog sleeps"
    rte = tasks.get_task("rte")
    data = input_pipeline.tokenize(rte, [Example(5, a, b, 1), Example(6, "short", "pair", None)], tokenizer, 12)
    ta, tb = bert_truncate_pair(tokenizer.tokenize(a), tokenizer.tokenize(b), 12 - 3)
    expected = ["[CLS]", *ta, "[SEP]", *tb, "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(data.input_ids[0].tolist()) == expected
    assert data.token_type_ids[0].tolist() == [0] * (len(ta) + 2) + [1] * (len(tb) + 1)
    assert data.lengths.tolist() == [12, 5]
    assert data.input_ids[1, 5:].tolist() == [0] * 7 and data.token_type_ids[1, 5:].tolist() == [0] * 7
    assert data.labels.tolist() == [1, -1] and data.labels.dtype == np.int32
    assert data.idx.tolist() == [5, 6] and data.idx.dtype == np.int64
    assert (data.input_ids.dtype, data.token_type_ids.dtype, data.lengths.dtype) == (np.int32,) * 3
    assert len(data) == 2 and data.max_seq_length == 12


def test_tokenize_single_sentences_and_regression(tokenizer):
    examples = [Example(0, "hello world", None, 2.5), Example(1, "hi", None, None)]
    data = input_pipeline.tokenize(tasks.get_task("stsb"), examples, tokenizer, 8)
    assert tokenizer.convert_ids_to_tokens(data.input_ids[0, :4].tolist()) == ["[CLS]", "hello", "world", "[SEP]"]
    assert not data.token_type_ids.any()
    assert data.labels.dtype == np.float32 and data.labels[0] == 2.5 and np.isnan(data.labels[1])


def test_tokenize_takes_regression_from_the_task_not_the_labels_python_type(tokenizer):
    """Whole-number STS-B scores stay regression targets, and float class indices stay classes."""
    stsb = input_pipeline.tokenize(
        tasks.get_task("stsb"), [Example(0, "a", "b", 3), Example(1, "c", "d", 0), Example(2, "e", "f", None)],
        tokenizer, 8,
    )
    assert stsb.labels.dtype == np.float32
    assert stsb.labels[:2].tolist() == [3.0, 0.0] and np.isnan(stsb.labels[2])
    unlabeled = input_pipeline.tokenize(tasks.get_task("stsb"), [Example(0, "a", "b", None)], tokenizer, 8)
    assert unlabeled.labels.dtype == np.float32 and np.isnan(unlabeled.labels[0])
    rte = input_pipeline.tokenize(tasks.get_task("rte"), [Example(0, "a", "b", 1.0), Example(1, "c", "d", 0.0)],
                                  tokenizer, 8)
    assert rte.labels.dtype == np.int32 and rte.labels.tolist() == [1, 0]


@pytest.mark.parametrize("label", [2, -1, 0.5])
def test_tokenize_refuses_labels_that_are_not_classes_of_the_task(tokenizer, label):
    with pytest.raises(errors.DataError, match=r"not class indices of task 'rte' \(0\.\.1\)"):
        input_pipeline.tokenize(tasks.get_task("rte"), [Example(0, "a", "b", label)], tokenizer, 8)


def test_bucketing_halves_padding_on_sst2_dev(glue_dir, tokenizer):
    examples = glue_data.read_examples(tasks.get_task("sst2"), "dev", glue_dir=glue_dir)
    data = input_pipeline.tokenize(tasks.get_task("sst2"), examples, tokenizer, 128)

    def padded(buckets):
        batches = input_pipeline.eval_batches(data, layout(eval_batch_size=32, buckets=buckets, max_seq_length=128))
        return int(sum(b["segment_ids"].size - b["segment_ids"].sum() for b in batches))

    bucketed, unbucketed = padded((32, 64, 128)), padded((128,))
    print(f"SST-2 dev padded tokens: bucketed {bucketed}, all to 128 {unbucketed}")
    # 872 rows padded to 28 batches of 32, each row 128 long, less the real tokens.
    assert unbucketed == 28 * 32 * 128 - data.lengths.sum() - 24 * data.lengths[0]
    assert bucketed < unbucketed / 2


# --- Training batches --------------------------------------------------------------------------


def fake_dataset(n=50, max_seq_length=16, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_seq_length + 1, n).astype(np.int32)
    positions = np.arange(max_seq_length)
    input_ids = np.where(positions < lengths[:, None], rng.integers(1, 1000, (n, max_seq_length)), 0)
    return input_pipeline.TokenizedDataset(
        input_ids=input_ids.astype(np.int32),
        token_type_ids=np.zeros((n, max_seq_length), np.int32),
        lengths=lengths,
        labels=rng.integers(0, 2, n).astype(np.int32),
        idx=np.arange(n, dtype=np.int64),
    )


def layout(**kwargs):
    """A Layout of 8-example batches over 2 devices of one host, rows of at most 16 tokens, unless `kwargs` say other."""
    kwargs = {"global_batch_size": 8, "eval_batch_size": 8, "num_devices": 2, "max_seq_length": 16, "buckets": (4, 8),
              "process_index": 0, "process_count": 1, **kwargs}
    return input_pipeline.Layout(**kwargs)


def train_iterator(dataset, seed=0, **kwargs):
    return input_pipeline.TrainIterator(dataset, layout(max_seq_length=dataset.max_seq_length, **kwargs), seed=seed)


def rows(batch):
    return batch["idx"].reshape(-1).tolist()


def test_train_batches_have_the_promised_shapes():
    data = fake_dataset()
    batch = next(train_iterator(data))
    length = batch["input_ids"].shape[-1]
    assert length in (4, 8, 16) and length >= data.lengths[rows(batch)].max()
    assert length == 4 or length // 2 < data.lengths[rows(batch)].max()  # the smallest bucket that fits
    for key in ("input_ids", "token_type_ids", "segment_ids"):
        assert batch[key].shape == (2, 4, length) and batch[key].dtype == np.int32
    assert batch["label"].shape == batch["weight"].shape == (2, 4)
    assert batch["weight"].dtype == np.float32 and (batch["weight"] == 1).all()
    np.testing.assert_array_equal(batch["segment_ids"].sum(-1).reshape(-1), data.lengths[rows(batch)])
    np.testing.assert_array_equal(batch["label"].reshape(-1), data.labels[rows(batch)])


def test_epochs_drop_the_partial_batch_and_visit_each_example_once():
    iterator = train_iterator(fake_dataset(50))
    assert iterator.steps_per_epoch == 6
    epoch = [row for batch in itertools.islice(iterator, 6) for row in rows(batch)]
    assert len(set(epoch)) == 48
    assert iterator.state() == {"epoch": 1, "step": 0}


def test_shuffling_depends_on_seed_and_epoch():
    data = fake_dataset()
    first = [rows(b) for b in itertools.islice(train_iterator(data, seed=0), 12)]
    again = [rows(b) for b in itertools.islice(train_iterator(data, seed=0), 12)]
    other_seed = [rows(b) for b in itertools.islice(train_iterator(data, seed=1), 12)]
    assert first == again
    assert first[:6] != other_seed[:6]
    assert first[:6] != first[6:]  # epoch 1 is ordered differently from epoch 0


def test_resume_continues_with_identical_batches():
    data = fake_dataset()
    reference = train_iterator(data, seed=3)
    expected = list(itertools.islice(reference, 15))
    interrupted = train_iterator(data, seed=3)
    list(itertools.islice(interrupted, 8))
    state = interrupted.state()
    assert state == {"epoch": 1, "step": 2}
    resumed = train_iterator(data, seed=3)
    resumed.restore(state)
    assert (resumed.epoch, resumed.step) == (1, 2)
    for want, got in zip(expected[8:], itertools.islice(resumed, 7)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_restore_rejects_a_state_that_does_not_fit():
    with pytest.raises(errors.CheckpointError, match="steps per epoch"):
        train_iterator(fake_dataset()).restore({"epoch": 0, "step": 6})


@pytest.mark.parametrize("packing", [False, True])
def test_two_hosts_partition_the_global_batch(packing):
    data = fake_dataset()
    whole = train_iterator(data, global_batch_size=8, num_devices=2, packing=packing)
    hosts = [
        train_iterator(data, global_batch_size=8, num_devices=1, process_index=i, process_count=2, packing=packing)
        for i in (0, 1)
    ]
    for _ in range(10):
        expected = next(whole)
        parts = [next(h) for h in hosts]
        assert expected.keys() == parts[0].keys()
        for key in expected:
            # Host i holds device shard i of the global batch (examples [4i, 4i + 4)), at the global batch's shape.
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_batch_size_must_divide_over_hosts_and_devices():
    with pytest.raises(errors.ConfigError, match="global_batch_size=6"):
        train_iterator(fake_dataset(), global_batch_size=6, num_devices=2, process_count=2)
    with pytest.raises(errors.ConfigError, match="global_batch_size=64 is larger than the dataset"):
        train_iterator(fake_dataset(50), global_batch_size=64)


# --- Evaluation batches ------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_score_every_example_exactly_once(process_count, packing):
    data = fake_dataset(53)
    scored, total_weight = [], 0.0
    for process_index in range(process_count):
        for batch in input_pipeline.eval_batches(
            data, layout(packing=packing, process_index=process_index, process_count=process_count)
        ):
            assert batch["input_ids"].shape[0] == 2
            assert batch["idx"].shape == batch["weight"].shape == batch["label"].shape == (2, 4 // process_count)
            real = batch["weight"] > 0
            scored += batch["idx"][real].tolist()
            total_weight += batch["weight"].sum()
            assert (batch["idx"][~real] == -1).all()
            if not packing:
                assert batch["input_ids"].shape[1] == 4 // process_count
                assert batch["segment_ids"].sum(-1).min() > 0
    assert total_weight == 53
    assert sorted(scored) == list(range(53))


def test_eval_batches_check_batch_size_before_iterating():
    with pytest.raises(errors.ConfigError, match="global_batch_size=7"):
        input_pipeline.eval_batches(fake_dataset(), layout(global_batch_size=7, eval_batch_size=7))


# --- Packing -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda row_length: st.tuples(
    st.just(row_length), st.lists(st.integers(1, row_length), max_size=40))))
def test_pack_rows_places_every_example_whole_once_in_few_rows(case):
    row_length, lengths = case
    rows = input_pipeline.pack_rows(lengths, row_length)
    assert sorted(position for row in rows for position in row) == list(range(len(lengths)))
    totals = [sum(lengths[position] for position in row) for row in rows]
    assert all(0 < total <= row_length for total in totals)
    # First fit: a later row's examples did not fit the room an earlier row had left, so no two rows
    # could be merged (which also keeps the count under twice the tokens' lower bound, plus one).
    assert all(totals[i] + totals[j] > row_length for i in range(len(rows)) for j in range(i + 1, len(rows)))


def test_pack_rows_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="longer than the row length 8: 9"):
        input_pipeline.pack_rows([3, 9], 8)


def test_packed_row_counts_are_at_most_eight_and_end_at_one_row_per_example():
    assert input_pipeline.packed_row_counts(32).tolist() == [4, 8, 12, 16, 20, 24, 28, 32]
    assert input_pipeline.packed_row_counts(3).tolist() == [1, 2, 3]


def unpack(batch, device, example, row_length):
    """(input_ids, token_type_ids, position_ids) of one example of a packed batch, read off its segment."""
    row, start = divmod(int(batch["cls_index"][device, example]), row_length)
    segments = batch["segment_ids"][device, row]
    span = np.flatnonzero(segments == segments[start])
    assert span[0] == start and (np.diff(span) == 1).all(), "an example's tokens are one contiguous run"
    return tuple(batch[key][device, row, span] for key in ("input_ids", "token_type_ids", "position_ids"))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(8, 60),
    max_seq_length=st.integers(4, 24),
    seed=st.integers(0, 2**16),
    num_devices=st.sampled_from([1, 2, 4]),
)
def test_packing_keeps_the_batchs_examples_whole_and_unchanged(n, max_seq_length, seed, num_devices):
    data = fake_dataset(n, max_seq_length, seed)
    data.token_type_ids = (np.arange(max_seq_length) >= data.lengths[:, None] // 2).astype(np.int32)
    packed_iter, bucketed_iter = (
        train_iterator(data, seed=seed, global_batch_size=8, num_devices=num_devices, packing=packing)
        for packing in (True, False)
    )
    for _ in range(3):
        packed, bucketed = next(packed_iter), next(bucketed_iter)
        for key in ("label", "weight", "idx"):  # the same examples, in the same order, on the same devices
            np.testing.assert_array_equal(packed[key], bucketed[key])
        assert packed["input_ids"].shape[1] in input_pipeline.packed_row_counts(8 // num_devices)
        real_tokens = 0
        for device, example in np.ndindex(packed["idx"].shape):
            row = packed["idx"][device, example]
            length = data.lengths[row]
            input_ids, token_type_ids, position_ids = unpack(packed, device, example, max_seq_length)
            np.testing.assert_array_equal(input_ids, data.input_ids[row, :length])
            np.testing.assert_array_equal(token_type_ids, data.token_type_ids[row, :length])
            np.testing.assert_array_equal(position_ids, np.arange(length))
            real_tokens += length
        assert np.count_nonzero(packed["segment_ids"]) == real_tokens  # nothing else in the rows
        assert not packed["input_ids"][packed["segment_ids"] == 0].any()


def test_packed_fillers_take_no_room_and_point_at_the_first_token():
    data = fake_dataset(5, 16)
    (batch,) = input_pipeline.eval_batches(data, layout(packing=True, buckets=(32, 64, 128)))
    assert batch["idx"].tolist() == [[0, 1, 2, 3], [4, -1, -1, -1]]
    assert batch["cls_index"][1, 1:].tolist() == [0, 0, 0]
    assert np.count_nonzero(batch["segment_ids"]) == data.lengths.sum()
    stats = benchmarking.batch_stats([batch])
    assert stats.real_tokens == data.lengths.sum() and stats.token_slots == batch["segment_ids"].size


def test_batch_stats_count_fillers_as_padding_and_shapes_once():
    data = fake_dataset(12, 8)
    batches = list(input_pipeline.eval_batches(data, layout(max_seq_length=8, buckets=(8,))))
    stats = benchmarking.batch_stats(batches)
    assert (stats.batches, stats.token_slots, stats.real_tokens) == (2, 2 * 8 * 8, data.lengths.sum())
    assert stats.padded_fraction == pytest.approx(1 - data.lengths.sum() / 128)
    assert stats.compiled_shapes == 1


@pytest.mark.parametrize("name, train_examples", [("sst2", 5000), ("rte", 0)])
def test_packing_cuts_the_padding_of_real_epochs_and_compiles_a_few_shapes(glue_dir, tokenizer, name, train_examples):
    """One training epoch (SST-2: the benchmark's 5,000-example subset) and dev, packed vs bucketed."""
    task = tasks.get_task(name)
    examples = glue_data.read_examples(task, "train", glue_dir=glue_dir)
    if train_examples:
        examples = [examples[i] for i in glue_data.train_subset_indices(len(examples), train_examples)]
    train = input_pipeline.tokenize(task, examples, tokenizer, 128)
    dev = input_pipeline.tokenize(task, glue_data.read_examples(task, "dev", glue_dir=glue_dir), tokenizer, 128)

    def epoch(packing):
        iterator = input_pipeline.TrainIterator(
            train, layout(global_batch_size=32, max_seq_length=128, buckets=(32, 64, 128), packing=packing), seed=0
        )
        return benchmarking.batch_stats(itertools.islice(iterator, iterator.steps_per_epoch))

    def evaluation(packing):
        return benchmarking.batch_stats(input_pipeline.eval_batches(
            dev, layout(eval_batch_size=128, max_seq_length=128, buckets=(32, 64, 128), packing=packing)
        ))

    stats = {(split, packing): measure(packing) for split, measure in (("train", epoch), ("dev", evaluation))
             for packing in (True, False)}
    for (split, packing), s in stats.items():
        print(f"{name} {split} {'packed' if packing else 'bucketed'}: {s.batches} batches, "
              f"padded fraction {s.padded_fraction:.3f}, {s.compiled_shapes} shapes")
    for split in ("train", "dev"):
        packed, bucketed = stats[split, True], stats[split, False]
        assert packed.batches == bucketed.batches and packed.real_tokens == bucketed.real_tokens
        assert packed.padded_fraction < bucketed.padded_fraction / 2  # measured: 0.19-0.32 vs 0.48-0.77
        assert packed.compiled_shapes <= 3
