"""GLUE leaderboard files: written, read back, and checked against the server's format."""

import numpy as np
import pytest

from adapter_jax import errors, glue_data, submission, tasks

# The value column the GLUE server accepts for each task.
VALID_PREDICTIONS = {
    "cola": {"0", "1"},
    "sst2": {"0", "1"},
    "mrpc": {"0", "1"},
    "qqp": {"0", "1"},
    "wnli": {"0", "1"},
    "rte": {"entailment", "not_entailment"},
    "qnli": {"entailment", "not_entailment"},
    "mnli": {"entailment", "neutral", "contradiction"},
    "ax": {"entailment", "neutral", "contradiction"},
}

TEST_SPLITS = [(task, split) for task in tasks.TASKS.values() for split in task.test_splits]


@pytest.mark.parametrize("task, split", TEST_SPLITS, ids=[f"{t.name}-{s}" for t, s in TEST_SPLITS])
def test_round_trip(tmp_path, task, split):
    rng = np.random.default_rng(0)
    idx = rng.permutation(40)
    predictions = rng.uniform(0, 5, 40) if task.is_regression else rng.integers(0, task.num_labels, 40)
    path = submission.write_submission(task, split, idx, predictions, tmp_path / "out")
    assert path == tmp_path / "out" / task.submission_files[split]
    assert path.read_text().split("\n")[0] == "index\tprediction"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind

    read_idx, read_predictions = submission.read_submission(path)
    assert read_idx.tolist() == list(range(40))
    expected = predictions[np.argsort(idx)]
    if task.is_regression:
        np.testing.assert_array_equal(read_predictions.astype(np.float64), expected)
    else:
        assert set(read_predictions) <= VALID_PREDICTIONS[task.name]
        assert [task.labels.index(p) for p in read_predictions] == expected.tolist()


def test_real_rte_test_file_gives_a_full_submission(glue_dir, tmp_path):
    task = tasks.get_task("rte")
    examples = glue_data.read_examples(task, "test", glue_dir=glue_dir)
    idx = np.array([e.idx for e in examples])
    path = submission.write_submission(task, "test", idx, np.arange(len(idx)) % 2, tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 3001 and lines[:3] == ["index\tprediction", "0\tentailment", "1\tnot_entailment"]


def test_overwrites_an_existing_file(tmp_path):
    task = tasks.get_task("sst2")
    submission.write_submission(task, "test", np.arange(3), np.zeros(3, int), tmp_path)
    path = submission.write_submission(task, "test", np.arange(2), np.ones(2, int), tmp_path)
    assert submission.read_submission(path)[1].tolist() == ["1", "1"]


def test_bad_predictions_are_refused(tmp_path):
    rte = tasks.get_task("rte")
    with pytest.raises(errors.ConfigError, match="test splits: test_matched, test_mismatched"):
        submission.write_submission(tasks.get_task("mnli"), "test", np.arange(2), np.zeros(2, int), tmp_path)
    with pytest.raises(errors.DataError, match="outside 0..1"):
        submission.write_submission(rte, "test", np.arange(2), np.array([0, 2]), tmp_path)
    with pytest.raises(errors.DataError, match="duplicate"):
        submission.write_submission(rte, "test", np.array([0, 0]), np.array([0, 1]), tmp_path)
    with pytest.raises(errors.DataError, match="differ"):
        submission.write_submission(rte, "test", np.arange(3), np.array([0, 1]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_read_submission_names_the_bad_line(tmp_path):
    path = tmp_path / "RTE.tsv"
    path.write_text("index\tprediction\n0\tentailment\nx\tentailment\n")
    with pytest.raises(errors.DataError, match=f"{path}:3"):
        submission.read_submission(path)
    path.write_text("id\tlabel\n0\t1\n")
    with pytest.raises(errors.DataError, match=f"{path}:1: expected header"):
        submission.read_submission(path)
