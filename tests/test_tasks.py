"""The task registry against GLUE's own conventions and TFDS's glue builder configs."""

import pytest

from adapter_jax import errors, metrics, tasks

# gluebenchmark.com's expected file names, one per test split.
LEADERBOARD_FILES = {
    ("cola", "test"): "CoLA.tsv",
    ("sst2", "test"): "SST-2.tsv",
    ("mrpc", "test"): "MRPC.tsv",
    ("stsb", "test"): "STS-B.tsv",
    ("qqp", "test"): "QQP.tsv",
    ("mnli", "test_matched"): "MNLI-m.tsv",
    ("mnli", "test_mismatched"): "MNLI-mm.tsv",
    ("qnli", "test"): "QNLI.tsv",
    ("rte", "test"): "RTE.tsv",
    ("wnli", "test"): "WNLI.tsv",
    ("ax", "test"): "AX.tsv",
}


def test_every_glue_task_is_registered():
    assert set(tasks.TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"}
    assert all(tasks.get_task(name).name == name for name in tasks.TASKS)


def test_submission_files_match_the_leaderboard():
    found = {(t.name, split): file for t in tasks.TASKS.values() for split, file in t.submission_files.items()}
    assert found == LEADERBOARD_FILES


@pytest.mark.parametrize("task", tasks.TASKS.values(), ids=lambda t: t.name)
def test_task_is_consistent(task):
    assert task.main_metric in task.metrics
    assert set(task.metrics) <= set(metrics.METRICS)
    assert set(task.tfds_splits) == set(task.splits)
    assert set(task.submission_files) == set(task.test_splits)
    assert set(task.dev_splits) | set(task.test_splits) | {"train"} >= set(task.splits)
    assert len(task.text_columns) == len(task.tfds_text_features) in (1, 2)
    assert task.tfds_name == f"glue/{task.name}"


def test_metrics_and_labels_follow_glue():
    assert tasks.get_task("cola").metrics == ("matthews_corr",)
    assert set(tasks.get_task("mrpc").metrics) == set(tasks.get_task("qqp").metrics) == {"f1", "accuracy"}
    assert set(tasks.get_task("stsb").metrics) == {"pearson", "spearman"}
    for name in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert tasks.get_task(name).metrics == ("accuracy",)
    regression = [t.name for t in tasks.TASKS.values() if t.is_regression]
    assert regression == ["stsb"]
    assert tasks.get_task("stsb").num_labels == 1
    assert tasks.get_task("mnli").num_labels == tasks.get_task("ax").num_labels == 3
    assert tasks.get_task("rte").num_labels == 2


def test_mnli_splits_and_result_names():
    mnli = tasks.get_task("mnli")
    assert mnli.dev_splits == ("dev_matched", "dev_mismatched")
    assert mnli.test_splits == ("test_matched", "test_mismatched")
    assert [mnli.result_name(s) for s in mnli.dev_splits] == ["mnli_m", "mnli_mm"]
    assert tasks.get_task("rte").result_name("dev") == "rte"
    assert tasks.get_task("ax").splits == {"test": "diagnostic.tsv"}
    assert tasks.get_task("ax").dir_name == "diagnostic"


def test_glue_tasks_and_score_columns_follow_the_leaderboard():
    assert tasks.GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
    assert tasks.GLUE_SCORE_COLUMNS == (
        "cola", "sst2", "mrpc", "stsb", "qqp", "mnli_m", "mnli_mm", "qnli", "rte", "wnli"
    )


def test_unknown_task_lists_known_names():
    with pytest.raises(errors.ConfigError, match="known tasks: .*rte.*wnli"):
        tasks.get_task("glue")


def test_task_is_immutable_and_hashable():
    rte = tasks.get_task("rte")
    with pytest.raises(TypeError):
        rte.splits["train"] = "other.tsv"
    assert {rte: 1}[tasks.get_task("rte")] == 1


@pytest.mark.parametrize("task", tasks.TASKS.values(), ids=lambda t: t.name)
def test_matches_tfds_glue_config(task):
    """Class indices mean the same label whichever reader produced them (TSV or TFDS)."""
    glue = pytest.importorskip("tensorflow_datasets.text.glue")
    config = {c.name: c for c in glue.Glue.BUILDER_CONFIGS}[task.name]
    assert tuple(config.text_features) == task.tfds_text_features
    if task.is_regression:
        assert config.label_classes is None
    elif task.labels == tasks.BINARY:
        # TFDS maps the TSV's "0"/"1" to class 0/1, whatever it calls them.
        assert len(config.label_classes) == 2
    else:
        assert tuple(config.label_classes) == task.labels
