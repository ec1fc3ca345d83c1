"""Serving on the real MiniLM: RTE and SST-2 exports answered together give what predicting each alone gives;
on the tiny model, serving's limits: what one client sends cannot hold up the others, a bad line is answered
alone."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from adapter_jax import glue_data, predict, submission, tasks, train
from scripts import serve_load_test

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


# Serving's limits, on the tiny model: a server that no client can hold up, and a batch job that answers a bad
# line alone. Each test below fails on the single-threaded server without limits that came before.
# The defaults of --read_timeout (seconds) and --max_body_bytes and --max_line_bytes; the tests pass no flag that
# the server before them lacked, so that on it they fail where it failed, not on a flag.
READ_TIMEOUT, MAX_BODY_BYTES, MAX_LINE_BYTES = 10, 4 << 20, 1 << 20
_NOUNS = ("cat", "dog", "bird", "fish", "horse", "cow", "lion", "bear")


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    """--adapters for tiny-model exports of RTE (sentence pairs) and SST-2 (single sentences), untrained."""
    from adapter_jax import experiment, export
    from configs import glue

    root, items = tmp_path_factory.mktemp("tiny-exports"), []
    for name in ("rte", "sst2"):
        config = glue.get_config(name)
        config.update(model=str(tiny_model_dir), max_seq_length=32, adapter_size=8)
        setup = experiment.build(config)
        items.append(f"{name}={export.write(root / name, setup.trainable_params, export.metadata(setup))}")
    return "--adapters=" + ",".join(items)


def _tiny_requests(count):
    """RTE and SST-2 requests of varied lengths, alternating; ids are 'task:index'."""
    requests = []
    for index in range(count):
        words = " and the ".join(_NOUNS[(index + k) % len(_NOUNS)] for k in range(1 + index % 5))
        request = {"id": f"rte:{index}", "task": "rte", "sentence1": f"the {words} sleep .",
                   "sentence2": f"a {_NOUNS[index % 3]} sleeps ."}
        if index % 2:
            request = {"id": f"sst2:{index}", "task": "sst2", "sentence1": f"the {words} is lovely ."}
        requests.append(request)
    return requests


def _serve(arguments, **kwargs):
    command = [sys.executable, "-m", "adapter_jax.serve", *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False, **kwargs)


@pytest.fixture(scope="module")
def batch_job(tiny_adapters, tmp_path_factory):
    """The batch job's answers to 32 good lines with a non-UTF-8 line, a line over --max_line_bytes and a blank
    line among them: (input path, output lines, the run)."""
    lines = [json.dumps(request).encode() for request in _tiny_requests(32)]
    lines[5:5] = [b'{"id": "latin-1", "task": "sst2", "sentence1": "caf\xe9"}', b"",
                  b'["' + b"x" * MAX_LINE_BYTES + b'"]']
    requests = tmp_path_factory.mktemp("batch") / "requests.jsonl"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    output = requests.with_name("answers.jsonl")
    run = _serve([tiny_adapters, f"--input={requests}", f"--output={output}", "--batch_sizes=4,16"])
    return requests, [json.loads(line) for line in output.read_text().splitlines()] if run.returncode == 0 else [], run


def test_batch_job_answers_a_non_utf8_or_overlong_line_alone(batch_job):
    requests, answers, run = batch_job
    assert run.returncode == 0 and "2 error answers" in run.stderr, run.stderr
    assert [answer.get("error") for answer in answers[5:7]] == [
        f"{requests}:6: not UTF-8 (invalid continuation byte at byte 51)",
        f"{requests}:8: the line is longer than --max_line_bytes={MAX_LINE_BYTES}",
    ]
    good = answers[:5] + answers[7:]
    assert [answer["id"] for answer in good] == [request["id"] for request in _tiny_requests(32)]
    assert all("label" in answer for answer in good)


def test_a_name_given_twice_in_adapters_is_refused_naming_both(tiny_adapters, tmp_path):
    paths = dict(item.split("=") for item in tiny_adapters.removeprefix("--adapters=").split(","))
    run = _serve([f"--adapters=rte={paths['rte']},rte={paths['sst2']}", f"--input={tmp_path / 'in'}",
                  f"--output={tmp_path / 'out'}"])
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --adapters: the name 'rte' is given twice, for {paths['rte']} and {paths['sst2']}")


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The export does not exist: a server that loaded before binding would report it instead.
        run = _serve([f"--adapters=rte={tmp_path / 'missing'}", f"--port={port}"])
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --host/--port: cannot listen on 127.0.0.1:{port}: Address already in use")


@pytest.fixture(scope="module")
def tiny_server(tiny_adapters):
    """A server of the tiny exports, its shapes compiled: (port, its console lines)."""
    server = subprocess.Popen([sys.executable, "-m", "adapter_jax.serve", tiny_adapters, "--port=0",
                               "--batch_sizes=4,16"],
                              cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = [server.stderr.readline()]
        while lines[-1] and not lines[-1].startswith("serving"):
            lines.append(server.stderr.readline())
        assert lines[-1].startswith("serving rte, sst2 on port "), lines
        port = int(lines[-1].split()[-1])
        for size in (1, 16):
            assert serve_load_test.post(port, _tiny_requests(size))[0] == 200
        yield port, lines
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_idle_connection_or_a_short_body_holds_up_no_one(tiny_server):
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as idle, \
            socket.create_connection(("127.0.0.1", port)) as short:
        short.sendall(b"POST / HTTP/1.0\r\nContent-Length: 100\r\n\r\n[{")
        start = time.monotonic()
        status, answers = serve_load_test.post(port, _tiny_requests(3), timeout=READ_TIMEOUT - 1)
        assert status == 200 and len(answers) == 3 and time.monotonic() - start < READ_TIMEOUT - 1
        # What they left unfinished is closed after the read timeout: the short body with its own answer.
        short.settimeout(3 * READ_TIMEOUT)
        idle.settimeout(3 * READ_TIMEOUT)
        assert short.recv(4096).startswith(b"HTTP/1.0 408 ")
        assert idle.recv(1) == b""


def _raw_answer(port, head):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head)
        reply = b""
        while chunk := connection.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_bad_or_huge_content_length_is_answered_without_reading(tiny_server):
    port, _ = tiny_server
    post = b"POST / HTTP/1.0\r\n%s\r\n\r\n"
    assert _raw_answer(port, post % b"Content-Length: abc") == (400, "Content-Length 'abc' is not a whole number of bytes")
    assert _raw_answer(port, post % b"Content-Length: 1e14")[0] == 400
    assert _raw_answer(port, post % b"Content-Length: 100000000000000") == (
        413, f"the body has 100000000000000 bytes; at most {MAX_BODY_BYTES} are taken")
    assert _raw_answer(port, post % b"Accept: */*")[0] == 411
    assert serve_load_test.post(port, _tiny_requests(2), timeout=30)[0] == 200


def _non_loopback_address():
    """An IPv4 address of this machine other than loopback, or None (the route's source; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_listens_on_loopback_only_by_default(tiny_server):
    port, lines = tiny_server
    assert f"listening on 127.0.0.1:{port}; loading the adapters\n" in lines
    address = _non_loopback_address()
    if address is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=10).close()


def test_concurrent_load_with_idle_and_slow_clients_gets_the_batch_jobs_answers(tiny_server, batch_job):
    port, _ = tiny_server
    _, expected_lines, _ = batch_job
    expected = {answer["id"]: answer for answer in expected_lines if "error" not in answer}
    result = serve_load_test.load(port, _tiny_requests(32), clients=8, idle=2, slow=2, slow_interval=0.2,
                                  timeout=30)
    assert result.failures == [] and set(result.answers) == set(expected)
    for request_id, answer in result.answers.items():
        assert answer["label"] == expected[request_id]["label"], request_id
        np.testing.assert_allclose(answer["logits"], expected[request_id]["logits"], atol=1e-5)
