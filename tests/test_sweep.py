"""The sweep: finishes a tiny grid, skips finished runs, resumes an interrupted one, picks the best."""

import json
import pathlib
import shutil

import pytest

from scripts import sweep


@pytest.fixture
def counting_train(monkeypatch):
    """The real train_and_evaluate, counting the runs it is asked to do."""
    calls = []

    def train_fn(config, workdir):
        calls.append(workdir.name)
        return sweep.train.train_and_evaluate(config, workdir)

    return calls, train_fn


def test_grid_follows_the_paper():
    runs = list(sweep.grid(["adapters", "full"], [3e-5, 3e-4, 3e-3], [3, 20], [8, 64, 256], [0, 1, 2, 3, 4]))
    assert len(runs) == 3 * 2 * 3 * 5 + 3 * 2 * 5
    assert len({sweep.run_name(r) for r in runs}) == len(runs)
    assert all("adapter_size" not in r for r in runs if r["mode"] == "full")


def test_default_flags_are_the_papers_grid():
    assert [float(lr) for lr in sweep.FLAGS["learning_rates"].default] == [3e-5, 3e-4, 3e-3]
    assert [int(e) for e in sweep.FLAGS["epochs"].default] == [3, 20]
    assert [int(m) for m in sweep.FLAGS["adapter_sizes"].default] == [8, 64, 256]
    assert [int(s) for s in sweep.FLAGS["seeds"].default] == [0, 1, 2, 3, 4]


@pytest.mark.slow  # four runs, swept three times
def test_sweep_skips_finished_runs_resumes_interrupted_ones_and_picks_the_best(tiny_config, tmp_path, counting_train):
    calls, train_fn = counting_train
    tiny_config.num_epochs = 1  # 8 steps a run; checkpoints at 4 and 8
    runs = list(sweep.grid(["adapters", "full"], [1e-2, 1e-3], [1], [8], [0]))
    first = sweep.sweep(tiny_config, tmp_path, runs, train_fn)
    assert len(calls) == 4 and len(first) == 4
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["score"] for r in lines] == [r["score"] for r in first]
    assert {r["mode"] for r in lines} == {"adapters", "full"}
    assert all(r["trainable_fraction"] < 0.5 for r in lines if r["mode"] == "adapters")

    calls.clear()
    again = sweep.sweep(tiny_config, tmp_path, runs, train_fn)
    assert calls == [] and again == first

    # Interrupt one run after its step-4 checkpoint: only that run trains again, and resumes to the same end.
    interrupted = tmp_path / sweep.run_name(runs[1])
    (interrupted / "summary.json").unlink()
    shutil.rmtree(interrupted / "checkpoints" / "8")
    calls.clear()
    resumed = sweep.sweep(tiny_config, tmp_path, runs, train_fn)
    assert calls == [interrupted.name]
    metrics = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 8
    for before, after in zip(first, resumed):
        assert before["dev_metrics"] == after["dev_metrics"] and before["final_dev_metrics"] == after["final_dev_metrics"]

    best = sweep.best_run(resumed)
    assert best["score"] == max(r["score"] for r in resumed)
    assert best["main_metric"] == "accuracy"


def test_best_run_uses_the_tasks_main_metric_score():
    results = [{"score": 0.2, "workdir": "a"}, {"score": 0.7, "workdir": "b"}, {"score": 0.7, "workdir": "c"}]
    assert sweep.best_run(results)["workdir"] == "b"
    assert sweep.best_run([]) is None


@pytest.mark.slow  # a sweep's run, its predictions and the report
def test_sweep_writes_test_predictions_the_report_gathers(tiny_config, tmp_path):
    from adapter_jax.results import RunResult
    from scripts import report

    tiny_config.num_epochs = 1
    runs = list(sweep.grid(["adapters"], [1e-2], [1], [8], [0]))
    (result,) = sweep.sweep(tiny_config, tmp_path / "sweep", runs, predict_test="selected")
    best = report.best_runs([RunResult.from_dict(result)])
    copied = report.copy_submission(best, next(iter(best)), tmp_path / "submission")
    assert [path.name for path in copied] == ["RTE.tsv"]
    assert len((tmp_path / "submission" / "RTE.tsv").read_text().splitlines()) == 1 + 20


def test_every_process_skips_the_runs_process_0_finished(tmp_path, monkeypatch):
    """Hosts with workdirs of their own (local disks): process 0 wrote a finished run's summary.json, process 1
    has nothing. Both skip the run, with process 0's summary; the sweep's files are process 0's alone."""
    import jax
    import ml_collections
    from jax.experimental import multihost_utils

    from adapter_jax import distributed

    (overrides,) = sweep.grid(["adapters"], [1e-2], [1], [8], [0])
    summary = {"mode": "adapters", "score": 0.75, "main_metric": "accuracy"}
    finished = tmp_path / "host0" / sweep.run_name(overrides)
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps(summary))

    sent = []  # what process 0 broadcast, in order: process 1 receives the same
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda *args, **kwargs: None)

    def train_fn(config, workdir):
        raise AssertionError(f"trained {workdir}, a run process 0 finished")

    def as_process(index, broadcast):
        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
        return sweep.sweep(ml_collections.ConfigDict(), tmp_path / f"host{index}", [overrides], train_fn)

    primary = as_process(0, lambda value: sent.append(value) or value)
    other = as_process(1, lambda value: sent.pop(0))
    assert sent == [] and [r["score"] for r in other] == [r["score"] for r in primary] == [0.75]
    assert (tmp_path / "host0" / "results.jsonl").exists() and not (tmp_path / "host1" / "results.jsonl").exists()


def test_the_sweep_predicts_the_runs_the_report_selects_after_the_grid(tmp_path, monkeypatch):
    """Fake training (a score per learning rate) and prediction: only the best run per task and method predicts,
    once every run has trained; a rerun with another grid selects among every run the folder has finished."""
    import ml_collections

    scores = {1e-3: 0.6, 1e-2: 0.7, 3e-2: 0.8, 1e-4: 0.5}
    events = []

    def train_fn(config, workdir):
        events.append(("train", workdir.name))
        summary = {"task": "rte", "mode": config.mode, "adapter_size": config.get("adapter_size", 0),
                   "learning_rate": config.learning_rate, "score": scores[config.learning_rate] - config.seed / 10}
        (workdir / "summary.json").parent.mkdir(parents=True, exist_ok=True)
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    def predict(config, workdir):
        events.append(("predict", workdir.name))
        (workdir / "submission").mkdir()
        (workdir / "submission" / "complete.json").write_text('{"files": []}')

    monkeypatch.setattr(sweep.predict, "predict", predict)
    base = ml_collections.ConfigDict({"mode": "adapters", "learning_rate": 0.0, "num_epochs": 1, "seed": 0,
                                      "top_k": 0, "adapter_size": 8})
    first = list(sweep.grid(["adapters", "full"], [1e-3, 1e-2], [1], [8], [0, 1]))
    sweep.sweep(base, tmp_path, first, train_fn, predict_test="selected")
    assert [kind for kind, _ in events] == ["train"] * 8 + ["predict"] * 2
    assert sorted(name for kind, name in events if kind == "predict") == [
        "adapters-m8-lr0.01-ep1-seed0", "full-lr0.01-ep1-seed0"]

    events.clear()
    second = list(sweep.grid(["adapters"], [3e-2, 1e-4], [1], [8], [0]))
    results = sweep.sweep(base, tmp_path, second, train_fn, predict_test="selected")
    assert events == [("train", "adapters-m8-lr0.03-ep1-seed0"), ("train", "adapters-m8-lr0.0001-ep1-seed0"),
                      ("predict", "adapters-m8-lr0.03-ep1-seed0")]
    assert [r["learning_rate"] for r in results] == [3e-2, 1e-4]
    recorded = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(recorded) == 10  # every run of both grids
    predicted = {pathlib.Path(r["workdir"]).name for r in recorded if "test_predictions_dir" in r}
    assert predicted == {"adapters-m8-lr0.01-ep1-seed0", "full-lr0.01-ep1-seed0", "adapters-m8-lr0.03-ep1-seed0"}

    events.clear()
    sweep.sweep(base, tmp_path, second, train_fn, predict_test="all")
    assert len(events) == 10 - 3 and {kind for kind, _ in events} == {"predict"}
