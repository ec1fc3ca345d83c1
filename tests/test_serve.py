"""Serving on the real MiniLM: RTE and SST-2 exports answered together give what predicting each alone gives."""

import json
import os
import pathlib
import subprocess
import sys
import urllib.request

import pytest

from adapter_jax import glue_data, predict, submission, tasks, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trainings of the real MiniLM on real GLUE rows; the server in a subprocess
# Rows kept of each real file: enough to mix tasks in a batch, few enough to train and predict in seconds.
ROWS = {"train": 16, "dev": 16, "test": 12}


@pytest.fixture(scope="module")
def small_glue_dir(glue_dir, tmp_path_factory):
    """The first rows of the real RTE and SST-2 files."""
    root = tmp_path_factory.mktemp("glue")
    for name in ("rte", "sst2"):
        task = tasks.get_task(name)
        (root / task.dir_name).mkdir()
        for split, rows in ROWS.items():
            lines = (glue_dir / task.dir_name / task.splits[split]).read_text(encoding="utf-8").splitlines()
            (root / task.dir_name / task.splits[split]).write_text("\n".join(lines[: rows + 1]) + "\n")
    return root


def _config(task, minilm_dir, glue_dir, adapter_size, train_pooler):
    from configs import glue

    config = glue.get_config(task)
    config.update(
        model=str(minilm_dir), glue_dir=str(glue_dir), max_seq_length=32, global_batch_size=8, eval_batch_size=16,
        num_train_steps=2, learning_rate=1e-2, adapter_size=adapter_size, train_pooler=train_pooler,
        log_every_steps=1,
    )
    return config


@pytest.fixture(scope="module")
def runs(minilm_dir, small_glue_dir, tmp_path_factory):
    """Workdirs of two short runs, RTE (adapters 8, pooler trained) and SST-2 (adapters 16), predicted alone."""
    workdirs = {}
    for name, size, pooler in (("rte", 8, True), ("sst2", 16, False)):
        config = _config(name, minilm_dir, small_glue_dir, size, pooler)
        workdirs[name] = tmp_path_factory.mktemp(name)
        train.train_and_evaluate(config, workdirs[name])
        predict.predict(config, workdirs[name])
    return workdirs


def _alone_predictions(workdir, task):
    idx, predictions = submission.read_submission(workdir / "submission" / task.submission_files["test"])
    return dict(zip(idx.tolist(), predictions.tolist(), strict=True))


def _requests(small_glue_dir):
    """Both test sets interleaved, plus three bad lines; ids are 'task:index'."""
    per_task = []
    for name in ("rte", "sst2"):
        examples = glue_data.read_examples(tasks.get_task(name), "test", glue_dir=small_glue_dir)
        per_task.append([
            {"id": f"{name}:{e.idx}", "task": name, "sentence1": e.text_a,
             **({} if e.text_b is None else {"sentence2": e.text_b})}
            for e in examples
        ])
    lines = [json.dumps(request) for pair in zip(*per_task, strict=True) for request in pair]
    lines[3:3] = ['{"id": "broken", "task": "rte"', json.dumps({"id": "x", "task": "cola", "sentence1": "a"}),
                  json.dumps({"id": "y", "task": "rte", "sentence1": "no hypothesis"})]
    return lines


def _check_answers(answers, runs):
    alone = {name: _alone_predictions(workdir, tasks.get_task(name)) for name, workdir in runs.items()}
    errors = [answer for answer in answers if "error" in answer]
    assert [answer["id"] for answer in errors] == [None, "x", "y"]
    assert "not valid JSON" in errors[0]["error"] and "unknown task 'cola'" in errors[1]["error"]
    assert "missing field 'sentence2'" in errors[2]["error"]
    good = [answer for answer in answers if "error" not in answer]
    assert len(good) == 2 * ROWS["test"]
    for answer in good:
        name, index = answer["id"].split(":")
        assert answer["label"] == alone[name][int(index)], answer
        assert len(answer["logits"]) == 2


def test_served_together_equals_predicted_alone(runs, small_glue_dir, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(_requests(small_glue_dir)) + "\n")
    output = tmp_path / "predictions.jsonl"
    adapters = f"--adapters=rte={runs['rte']},sst2={runs['sst2'] / 'export' / 'adapters.safetensors'}"
    command = [sys.executable, "-m", "adapter_jax.serve", adapters, f"--input={requests}", f"--output={output}"]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    assert "3 error answers" in run.stderr
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    _check_answers(answers, runs)
    assert answers[3]["error"].startswith(f"{requests}:4: not valid JSON")


def test_predict_together_writes_what_predict_alone_writes(runs, minilm_dir, small_glue_dir):
    alone = {name: _alone_predictions(workdir, tasks.get_task(name)) for name, workdir in runs.items()}
    config = _config("rte", minilm_dir, small_glue_dir, 8, False)
    results = predict.predict_together(config, [runs["rte"], runs["sst2"]])
    for name, workdir in runs.items():
        assert set(results[str(workdir)]["dev_metrics"]) == {"dev"}
        assert _alone_predictions(workdir, tasks.get_task(name)) == alone[name]


def test_http_answers_a_list_with_a_bad_request_among_good_ones(runs, small_glue_dir):
    command = [sys.executable, "-m", "adapter_jax.serve", f"--adapters=rte={runs['rte']},sst2={runs['sst2']}",
               "--port=0"]
    server = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = server.stderr.readline()
        while line and not line.startswith("serving"):
            line = server.stderr.readline()
        assert line.startswith("serving rte, sst2 on port "), line
        port = int(line.split()[-1])
        body = [json.loads(line) for line in _requests(small_glue_dir) if not line.startswith('{"id": "broken"')]
        body.insert(0, "not a request")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answers = json.loads(response.read())
        assert answers[0] == {"id": None, "error": "a request is a JSON object, found str"}
        _check_answers([{"id": None, "error": "not valid JSON"}, *answers[1:]], runs)
    finally:
        server.terminate()
        server.wait(timeout=30)
