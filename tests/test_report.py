"""scripts.report: best-run selection, the Table 1 markdown, the plot and the submission folder."""

import dataclasses
import json
import math
import pathlib

import matplotlib.collections
import numpy as np
import pytest

from adapter_jax import paper
from adapter_jax.errors import DataError
from adapter_jax.results import RunResult
from scripts import report, tradeoff


def _run(task: str, mode: str, score: float, **overrides) -> RunResult:
    run = {
        "task": task, "mode": mode, "model": "bert-large-uncased", "adapter_size": 64 if mode == "adapters" else None,
        "learning_rate": 3e-4, "num_epochs": 3, "seed": 0, "top_k": None, "workdir": f"/tmp/{task}",
        "dev_metrics": {"accuracy": score}, "main_metric": "accuracy", "score": score, "total_params": 340_000_000,
        "trainable_params": 1_000_000_000 if mode == "full" else 7_000_000,
        "trainable_fraction": 1.0 if mode == "full" else 0.021, "wall_time_s": 120.0, "source": "adapter-jax",
    }
    run.update(overrides)
    return RunResult.from_dict(run)


@pytest.fixture
def runs() -> list[RunResult]:
    return [
        _run("rte", "adapters", 0.70, adapter_size=8, trainable_fraction=0.005),
        _run("rte", "adapters", 0.74, adapter_size=64, seed=1),  # best rte adapter run overall
        _run("rte", "adapters", 0.66, adapter_size=64, seed=2),
        _run("rte", "full", 0.72),
        _run("cola", "adapters", 0.55, adapter_size=8, trainable_fraction=0.005),  # best cola adapter run
        _run("cola", "adapters", 0.52, adapter_size=64),
        _run("cola", "full", 0.58, dev_metrics={"matthews_corr": 0.58}, main_metric="matthews_corr"),
        _run("mnli", "adapters", 0.84, dev_metrics={"accuracy": 0.84, "accuracy_mm": 0.83}),
        _run("rte", "adapters", 0.80, source="adapterhub"),  # another trainer's runs never win ours
    ]


def _write_jsonl(path: pathlib.Path, runs: list[RunResult]) -> pathlib.Path:
    path.write_text("".join(json.dumps(run.to_dict()) + "\n" for run in runs), encoding="utf-8")
    return path


def test_load_results_reads_every_file_in_order(tmp_path, runs):
    first = _write_jsonl(tmp_path / "a.jsonl", runs[:3])
    second = _write_jsonl(tmp_path / "b.jsonl", runs[3:])
    assert report.load_results([first, second]) == runs


def test_load_results_names_the_bad_line(tmp_path, runs):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(runs[0].to_dict()) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"results.jsonl:3: not JSON"):
        report.load_results([path])
    path.write_text(json.dumps({"task": "rte", "mode": "full"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"results.jsonl:1: missing keys \['score'\]"):
        report.load_results([path])


def test_best_runs_picks_the_best_dev_score_per_task_and_method(runs):
    best = report.best_runs(runs)
    ours = "adapter-jax"
    assert best[ours, "adapters (best size)"]["rte"] is runs[1]
    assert best[ours, "adapters (best size)"]["cola"] is runs[4]
    assert best[ours, "adapters (size 64)"]["rte"] is runs[1]
    assert best[ours, "adapters (size 64)"]["cola"] is runs[5]
    assert best[ours, "adapters (size 8)"]["rte"] is runs[0]
    assert best[ours, "full fine-tuning"] == {"rte": runs[3], "cola": runs[6]}
    assert best["adapterhub", "adapters (best size)"] == {"rte": runs[8]}


def test_mnli_fills_both_columns():
    run = _run("mnli", "adapters", 0.84, dev_metrics={"accuracy": 0.84, "mnli_mm/accuracy": 0.83})
    assert report.column_scores(run) == pytest.approx({"mnli_m": 84.0, "mnli_mm": 83.0})
    assert report.column_scores(_run("SST-2", "full", 0.9)) == pytest.approx({"sst2": 90.0})
    assert report.column_scores(_run("wnli", "full", 0.6)) == {}  # not a Table 1 column


def test_paper_columns_are_the_glue_leaderboards_less_wnli():
    assert paper.COLUMNS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli_m", "mnli_mm", "qnli", "rte")
    assert set(paper.COLUMN_TITLES) == set(paper.COLUMNS)


def test_render_table_has_the_paper_rows_and_ours(runs):
    markdown = report.render_table(report.best_runs(runs), runs)
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][4:13] == [paper.COLUMN_TITLES[c] for c in paper.COLUMNS]
    row = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in lines if "|" in line}
    for paper_row in paper.TABLE_1:
        assert paper_row.name + "/paper (GLUE test)" in row
    assert "| 9.0x | 100% | 60.5 | 94.9 | 89.3 | 87.6 | 72.1 | 86.7 | 85.9 | 91.1 | 70.1 |" in markdown
    # Ours: best dev per task, in percent; every row is averaged over the columns we fill (CoLA, MNLI-m/mm, RTE).
    assert "Avg (4 of 9 columns)" in header
    best_size = row["adapters (best size)/adapter-jax"]
    assert "| 55.0 |" in best_size and "| 74.0 |" in best_size and "| 84.0 | 83.0 |" in best_size
    assert "| 72.0 |" in row["full fine-tuning/adapter-jax"] and "(partial)" in row["full fine-tuning/adapter-jax"]
    assert "| 80.0 |" in row["adapters (best size)/adapterhub"]
    # The appendix lists every run once, and marks the selected ones.
    appendix = markdown.split("## Every run")[1]
    assert sum(line.startswith("| rte ") for line in appendix.splitlines()) == 5
    assert "| rte | adapters (size 64) | adapter-jax | 0.0003 | 3 | 64 | 1 | 74.00 | 2.1% | 2.0 | yes |" in appendix


def test_glue_score_column_needs_all_nine_tasks():
    """BERT-large's leaderboard metrics as one method's dev runs: the GLUE score is its 80.5."""
    dev = {
        "cola": {"matthews_corr": 0.605}, "sst2": {"accuracy": 0.949}, "mrpc": {"f1": 0.893, "accuracy": 0.854},
        "stsb": {"pearson": 0.876, "spearman": 0.865}, "qqp": {"f1": 0.721, "accuracy": 0.893},
        "qnli": {"accuracy": 0.927}, "rte": {"accuracy": 0.701}, "wnli": {"accuracy": 0.651},
    }
    runs = [_run(task, "full", 0.5, all_dev_metrics={"dev": metrics}) for task, metrics in dev.items()]
    runs.append(_run(
        "mnli", "full", 0.867, dev_metrics={"accuracy": 0.867, "dev_mismatched/accuracy": 0.859},
        all_dev_metrics={"dev_matched": {"accuracy": 0.867}, "dev_mismatched": {"accuracy": 0.859}},
    ))
    runs.append(_run("rte", "adapters", 0.7, all_dev_metrics={"dev": {"accuracy": 0.7}}))
    lines = report.render_table(report.best_runs(runs)).splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert header.endswith("| Avg | GLUE score |")
    assert lines[lines.index(header) + 2].startswith("| BERT_LARGE full fine-tuning |")
    assert lines[lines.index(header) + 2].endswith("| 80.4 |")  # the paper's own Total
    row = {line.split("|")[1].strip(): line for line in lines if "| adapter-jax |" in line}
    assert row["full fine-tuning"].endswith("| 80.5 |")
    assert row["adapters (best size)"].endswith("| - |")  # RTE only
    assert math.isnan(report.glue_score({"rte": runs[-1]}))


@pytest.mark.parametrize("per_task", [False, True])
def test_plot_writes_a_png(tmp_path, runs, per_task):
    path = report.plot(report.best_runs(runs), tmp_path / "plots" / "figure.png", per_task=per_task)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_main_writes_report_plot_and_submission(tmp_path, runs):
    predictions = tmp_path / "rte_predictions"
    predictions.mkdir()
    (predictions / "RTE.tsv").write_text("index\tprediction\n0\tentailment\n", encoding="utf-8")
    runs[1] = dataclasses.replace(runs[1], test_predictions_dir=str(predictions))
    results = _write_jsonl(tmp_path / "results.jsonl", runs)
    out = tmp_path / "out"
    report.main([f"--results={results}", f"--out_dir={out}", f"--submission_dir={tmp_path / 'submission'}"])
    assert "## Every run" in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "params_vs_score.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / tradeoff.TRADEOFF_FILE).exists()  # no top_k or LayerNorm-only runs to trade off against
    assert (tmp_path / "submission" / "RTE.tsv").read_text(encoding="utf-8").startswith("index\tprediction")


def _tradeoff_runs() -> list[RunResult]:
    """Several runs per point (learning rate, epochs, seed vary); each point's best is marked."""
    return [
        _run("rte", "adapters", 0.60, adapter_size=2, trainable_params=20_000, learning_rate=3e-3),
        _run("rte", "adapters", 0.65, adapter_size=2, trainable_params=20_000),  # best m=2
        _run("rte", "adapters", 0.72, adapter_size=8, trainable_params=60_000, seed=1),  # best m=8
        _run("rte", "adapters", 0.70, adapter_size=8, trainable_params=60_000),
        _run("rte", "adapters", 0.74, adapter_size=64, trainable_params=400_000),
        _run("rte", "top_k", 0.55, top_k=1, trainable_params=2_000_000, num_epochs=20),
        _run("rte", "top_k", 0.58, top_k=1, trainable_params=2_000_000),  # best k=1
        _run("rte", "top_k", 0.62, top_k=2, trainable_params=4_000_000),
        _run("rte", "layernorm", 0.57, trainable_params=10_000),
        _run("rte", "full", 0.73, trainable_params=22_000_000),
        _run("rte", "adapters", 0.69, adapter_size=64, trainable_params=400_000, source="adapterhub"),
        _run("cola", "adapters", 0.30, adapter_size=8, trainable_params=60_000),
        _run("cola", "top_k", 0.20, top_k=3, trainable_params=6_000_000),
    ]


def test_tradeoff_plot_puts_each_methods_best_points_in_place(tmp_path):
    figure = tradeoff.plot_tradeoff(report.best_runs(_tradeoff_runs()), tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["cola", "rte"]
    lines = {
        ax.get_title(): {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()} for ax in panels
    }
    expected = {
        "rte": {
            "adapters (size m)": [(20_000, 65.0), (60_000, 72.0), (400_000, 74.0)],
            "fine-tuning the top k layers": [(2_000_000, 58.0), (4_000_000, 62.0)],
            "LayerNorm only": [(10_000, 57.0)],
            "full fine-tuning": [(22_000_000, 73.0)],
            "adapters (size m) [adapterhub]": [(400_000, 69.0)],
        },
        "cola": {"adapters (size m)": [(60_000, 30.0)], "fine-tuning the top k layers": [(6_000_000, 20.0)]},
    }
    for task, expected_lines in expected.items():
        assert lines[task].keys() == expected_lines.keys()
        for label, points in expected_lines.items():
            np.testing.assert_allclose(lines[task][label], points, err_msg=f"{task}: {label}")
    rte = panels[1]
    assert rte.get_xscale() == "log" and rte.get_ylabel() == "best dev accuracy (%)"
    assert panels[0].get_ylabel() == "best dev matthews_corr (%)"
    assert {text.get_text() for text in rte.texts} == {"m=2", "m=8", "m=64", "k=1", "k=2", ""}
    assert tradeoff.TRADEOFF_CLAIM in " ".join(text.get_text() for text in figure.texts)


def test_tradeoff_shows_the_seeds_of_each_points_best_setting(tmp_path):
    """Bars span the seeds of the best run's learning rate and epochs, dashes mark their mean; other settings'
    seeds are left out."""
    runs = [
        _run("sst2", "adapters", 0.80, adapter_size=8, trainable_params=60_000, seed=0),
        _run("sst2", "adapters", 0.84, adapter_size=8, trainable_params=60_000, seed=1),  # best
        _run("sst2", "adapters", 0.82, adapter_size=8, trainable_params=60_000, seed=2),
        _run("sst2", "adapters", 0.50, adapter_size=8, trainable_params=60_000, learning_rate=3e-5),  # other lr
        _run("sst2", "top_k", 0.70, top_k=1, trainable_params=2_000_000),  # one seed: no bar
    ]
    best = report.best_runs(runs)
    figure = tradeoff.plot_tradeoff(best, tmp_path / "tradeoff.png", runs)
    ax = figure.axes[0]
    (bars,) = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    np.testing.assert_allclose(bars.get_segments(), [[(60_000, 80.0), (60_000, 84.0)]])
    (dashes,) = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
    np.testing.assert_allclose(dashes.get_offsets(), [(60_000, 82.0)])
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
    assert lines["adapters (size m)"] == [[60_000, 84.0]]  # the line stays at the paper's best-of-seeds

    table = tradeoff.render_tradeoff(tradeoff.tradeoff_points(best, runs))
    adapters_row = next(row for row in table.splitlines() if "| m=8 |" in row)
    cells = [cell.strip() for cell in adapters_row.strip("|").split("|")]
    assert cells[3:] == ["60,000", "lr 0.0003, 3 epochs", "84.0", "3", "82.0 ± 2.0", "80.0-84.0"]
    top_k_row = next(row for row in table.splitlines() if "| k=1 |" in row)
    assert [cell.strip() for cell in top_k_row.strip("|").split("|")][-3:] == ["1", "70.0", "70.0-70.0"]


def test_main_draws_the_tradeoff_when_there_are_baselines(tmp_path):
    results = _write_jsonl(tmp_path / "results.jsonl", _tradeoff_runs())
    report.main([f"--results={results}", f"--out_dir={tmp_path / 'out'}"])
    assert (tmp_path / "out" / tradeoff.TRADEOFF_FILE).read_bytes().startswith(b"\x89PNG")


def test_the_committed_tradeoff_table_regenerates_from_the_committed_results():
    """docs/results/tradeoff/ is made by scripts.report from its committed results file alone (analyses.sh --report)."""
    results = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "tradeoff" / "sst2_results.jsonl"
    runs = report.load_results([results])
    table = tradeoff.render_tradeoff(tradeoff.tradeoff_points(report.best_runs(runs), runs))
    assert table == (results.parent / tradeoff.TRADEOFF_TABLE_FILE).read_text(encoding="utf-8")
