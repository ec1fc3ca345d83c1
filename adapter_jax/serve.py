"""Serves many tasks' adapters from one base model: a JSONL batch job, or JSON over HTTP.

    python -m adapter_jax.serve --adapters=rte=/tmp/rte,sst2=/tmp/sst2/export/adapters.safetensors \
        --input=requests.jsonl --output=predictions.jsonl
    python -m adapter_jax.serve --adapters=rte=/tmp/rte,sst2=/tmp/sst2 --port=8080

A request is {"id": ..., "task": NAME, "sentence1": ..., "sentence2": ...} (sentence2 for sentence-pair
tasks only); its answer is {"id", "task", "label", "logits"}, the label being the class name, or the score
for a regression task (STS-B). Over HTTP, POST a JSON list of requests and get the list of answers. A request
that names an unknown task, lacks a field or is not valid JSON gets {"id", "error"} alone; the others are
answered. Every request of a batch goes through the base model in the same mixed batches (bank.py).
"""

import http.server
import json
from collections.abc import Sequence
from typing import Any

from absl import flags
from etils import epath

from adapter_jax import bank as bank_lib
from adapter_jax import cli, evaluation, export, glue_data, logs
from adapter_jax.errors import AdapterJaxError

FLAGS = flags.FLAGS
flags.DEFINE_list("adapters", None, "NAME=PATH,...: each task's export file, export folder or training workdir.")
flags.DEFINE_string("input", None, "Requests, one JSON object a line (batch job).")
flags.DEFINE_string("output", None, "Answers, one JSON object a line, in the order of --input.")
flags.DEFINE_integer("port", None, "Answer POSTed JSON lists over HTTP on this port instead.")
flags.DEFINE_string("model", None, "Base model (folder or hub name); default: the one the first export names.")
flags.DEFINE_integer("capacity", 16, "Task slots of the bank (at least the number of --adapters).")
flags.DEFINE_list("batch_sizes", ["8", "64"], "The batch sizes that compile; requests are cut and padded to them.")
flags.mark_flags_as_required(["adapters"])
flags.register_multi_flags_validator(
    ["input", "output", "port"],
    lambda values: (values["port"] is None) != (values["input"] is None) and (values["input"] is None) == (
        values["output"] is None),
    "pass --input and --output, or --port",
)


def _request_problem(request: Any, bank: bank_lib.AdapterBank) -> str | None:
    """What makes `request` unanswerable, or None."""
    if not isinstance(request, dict):
        return f"a request is a JSON object, found {type(request).__name__}"
    missing = [key for key in ("id", "task", "sentence1") if key not in request]
    if missing:
        return f"missing field {', '.join(repr(key) for key in missing)}"
    if request["task"] not in bank.names:
        return f"unknown task {request['task']!r}; served: {', '.join(bank.names)}"
    texts = ["sentence1", "sentence2"] if len(bank.slot(request["task"]).task.text_columns) == 2 else ["sentence1"]
    if "sentence2" in texts and "sentence2" not in request:
        return f"missing field 'sentence2' (task {request['task']!r} takes a sentence pair)"
    if "sentence2" not in texts and "sentence2" in request:
        return f"task {request['task']!r} takes one sentence, but the request has 'sentence2'"
    wrong = [key for key in texts if not isinstance(request[key], str)]
    if wrong:
        return f"field {wrong[0]!r} is not a string"
    return None


def answer(bank: bank_lib.AdapterBank, requests: Sequence[Any]) -> list[dict[str, Any]]:
    """One answer per request, in order; the answerable ones are scored together in mixed batches."""
    answers: list[dict[str, Any] | None] = [None] * len(requests)
    by_task: dict[str, list[int]] = {}
    for position, request in enumerate(requests):
        problem = _request_problem(request, bank)
        if problem is None:
            by_task.setdefault(request["task"], []).append(position)
        else:
            answers[position] = error_answer(request.get("id") if isinstance(request, dict) else None, problem)
    parts = [
        (name, bank.tokenize(name, [
            glue_data.Example(i, requests[i]["sentence1"], requests[i].get("sentence2"), None) for i in rows
        ]))
        for name, rows in by_task.items()
    ]
    for (name, _), logits in zip(parts, bank.logits(parts) if parts else [], strict=True):
        task = bank.slot(name).task
        predictions = evaluation.to_predictions(logits, task)
        for i, row_logits, prediction in zip(by_task[name], logits, predictions, strict=True):
            label = float(prediction) if task.is_regression else task.labels[int(prediction)]
            answers[i] = {"id": requests[i]["id"], "task": name, "label": label, "logits": row_logits.tolist()}
    return answers


def error_answer(request_id: Any, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": message}


def answer_jsonl(bank: bank_lib.AdapterBank, input_path: epath.PathLike, output_path: epath.PathLike) -> int:
    """Answers every non-blank line of `input_path` into `output_path`, errors naming their line; returns
    the number of error answers."""
    requests, where, bad_json = [], [], {}
    for line_number, line in enumerate(epath.Path(input_path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where.append(f"{input_path}:{line_number}")
        try:
            requests.append(json.loads(line))
        except json.JSONDecodeError as e:
            bad_json[len(requests)] = f"not valid JSON ({e})"
            requests.append(None)
    answered = iter(answer(bank, [request for i, request in enumerate(requests) if i not in bad_json]))
    lines = [error_answer(None, bad_json[i]) if i in bad_json else next(answered) for i in range(len(requests))]
    for line, line_where in zip(lines, where, strict=True):
        if "error" in line:
            line["error"] = f"{line_where}: {line['error']}"
    epath.Path(output_path).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return sum("error" in line for line in lines)


def make_server(bank: bank_lib.AdapterBank, port: int) -> http.server.HTTPServer:
    """An HTTP server answering POSTed JSON lists; one request at a time, as the bank is one device program."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # http.server's name for the POST handler
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                requests = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._send(400, {"error": f"the body is not valid JSON ({e})"})
            if not isinstance(requests, list):
                return self._send(400, {"error": "the body must be a JSON list of requests"})
            return self._send(200, answer(bank, requests))

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):
            pass  # one line per request would bury the console

    return http.server.HTTPServer(("", port), Handler)


def load_bank(adapters: Sequence[str], model: str | None, capacity: int, batch_sizes: Sequence[int]) -> bank_lib.AdapterBank:
    """A bank holding each NAME=PATH of `adapters`, sized to the largest of them."""
    pairs = []
    for item in adapters:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise AdapterJaxError(f"--adapters: {item!r} is not NAME=PATH")
        pairs.append((name, path))
    exports = {name: export.read(path) for name, path in pairs}
    return bank_lib.AdapterBank.holding(exports, model, capacity=capacity, batch_sizes=batch_sizes)


def main(argv: list[str]) -> None:
    del argv
    with cli.exit_codes(OSError, ValueError):  # the files of --input and --output; ValueError: a --batch_sizes entry
        bank = load_bank(FLAGS.adapters, FLAGS.model, FLAGS.capacity, [int(size) for size in FLAGS.batch_sizes])
        if FLAGS.port is None:
            errors = answer_jsonl(bank, FLAGS.input, FLAGS.output)
            print(f"answered {FLAGS.input} into {FLAGS.output} ({errors} error answers)", file=logs.console())
            return
    server = make_server(bank, FLAGS.port)
    print(f"serving {', '.join(bank.names)} on port {server.server_address[1]}", file=logs.console(), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    cli.run(main)
