"""A gs:// workdir end to end, against a real Cloud Storage emulator (conftest.gcs_emulator): what a Cloud TPU user
runs, through the real entry points, with no file on local disk where the bucket is meant."""

import re
import signal
import sys

import pytest
from etils import epath

from adapter_jax.history import read_history
from adapter_jax.workdir import Workdir
from tests.conftest import GCS_BUCKET
from tests.test_cli_robustness import RUN, _command, _run, _start, _wait_for

pytestmark = pytest.mark.slow  # the entry points in subprocesses, on the Cloud Storage emulator
GRID = ["--modes=adapters", "--learning_rates=0.01", "--epochs=1", "--adapter_sizes=8", "--seeds=0"]


def test_a_bucket_workdir_trains_resumes_predicts_and_reports(
    gcs_env, tiny_model_dir, tiny_glue_dir, tmp_path
):
    sweep_dir = f"gs://{GCS_BUCKET}/{tmp_path.name}/sweep"
    # The sweep's run of GRID, trained by the main entry point as the sweep would (and then skipped by it).
    workdir = epath.Path(f"{sweep_dir}/adapters-m8-lr0.01-ep1-seed0")
    run = {**RUN, "num_train_steps": 6, "learning_rate": 0.01, "num_epochs": 1}
    train = _command("adapter_jax.main", workdir, tiny_model_dir, tiny_glue_dir, run=run)
    # Every process runs from tmp_path: a gs:// path taken for a local one would appear there as gs:/ or gs/.
    process = _start(train, tmp_path / "train.log", cwd=tmp_path, SLOW_STEPS=0.5, **gcs_env)
    checkpoints = workdir / "checkpoints"
    _wait_for(lambda: checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()), process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, process.log_path.read_text()

    resumed = _run(train, cwd=tmp_path, **gcs_env)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"Resumed from gs://.* at step [1-5]\.", resumed.stderr), resumed.stderr
    predicted = _run([*train, "--mode=predict"], cwd=tmp_path, **gcs_env)
    assert predicted.returncode == 0, predicted.stderr
    sweep = _run(_command("scripts.sweep", sweep_dir, tiny_model_dir, tiny_glue_dir, *GRID, run=run), cwd=tmp_path,
                 **gcs_env)
    assert sweep.returncode == 0, sweep.stderr
    report = _run([sys.executable, "-m", "scripts.report", f"--results={sweep_dir}/results.jsonl",
                   f"--out_dir={sweep_dir}/report", f"--submission_dir={sweep_dir}/upload"], cwd=tmp_path,
                  **gcs_env)
    assert report.returncode == 0, report.stderr

    steps = [r["step"] for r in read_history(workdir) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps logged after the SIGTERM's checkpoint are not repeated
    assert "6" in [p.name for p in checkpoints.iterdir()]
    for name in ("export/adapters.safetensors", "summary.json", "submission/RTE.tsv", "submission/complete.json"):
        assert (workdir / name).exists(), name
    sweep_path = epath.Path(sweep_dir)
    for name in ("results.jsonl", "best.json", "report/report.md", "upload/RTE.tsv"):
        assert (sweep_path / name).exists(), name
    assert (sweep_path / "upload" / "RTE.tsv").read_text() == (workdir / "submission" / "RTE.tsv").read_text()
    assert not Workdir(workdir).lock.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["train.log"]


def test_a_bucket_glue_folder_reads_as_the_local_one_for_us_and_for_the_peer(gcs_env, tiny_glue_dir, tmp_path):
    from adapter_jax import glue_data, reference, tasks

    bucket_glue = epath.Path(f"gs://{GCS_BUCKET}/{tmp_path.name}/glue")
    for path in (tiny_glue_dir / "RTE").iterdir():
        (bucket_glue / "RTE" / path.name).write_text(path.read_text())
    rte = tasks.get_task("rte")
    for split in ("train", "dev", "test"):
        assert (glue_data.read_examples(rte, split, glue_dir=str(bucket_glue))
                == glue_data.read_examples(rte, split, glue_dir=tiny_glue_dir))
    # The peer (PyTorch) reads a local copy: whole, or the subset our max_train_examples picks.
    for size in (0, 10):
        folder = reference.subset_folder(rte, str(bucket_glue), size, tmp_path / f"peer{size}")
        assert folder.is_relative_to(tmp_path)
        local = reference.subset_folder(rte, str(tiny_glue_dir), size, tmp_path / f"local{size}")
        for name in ("train.tsv", "dev.tsv"):
            assert (folder / name).read_text() == (local / name).read_text(), (size, name)
