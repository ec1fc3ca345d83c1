"""Serves many tasks' adapters from one base model: a JSONL batch job, or JSON over HTTP.

    python -m adapter_jax.serve --adapters=rte=/tmp/rte,sst2=/tmp/sst2/export/adapters.safetensors \
        --input=requests.jsonl --output=predictions.jsonl
    python -m adapter_jax.serve --adapters=rte=/tmp/rte,sst2=/tmp/sst2 --port=8080

A request is {"id": ..., "task": NAME, "sentence1": ..., "sentence2": ...} (sentence2 for sentence-pair
tasks only); its answer is {"id", "task", "label", "logits"}, the label being the class name, or the score
for a regression task (STS-B). Over HTTP, POST a JSON list of requests and get the list of answers. A request
that names an unknown task, lacks a field or is not valid JSON (in a batch job also a line that is not UTF-8
or longer than --max_line_bytes) gets {"id", "error"} alone; the others are
answered. Every request of a batch goes through the base model in the same mixed batches (bank.py); over HTTP,
requests that different clients send at the same time are batched together too (batching.py), and no client
can hold up the others (http_server.py: timeouts, size limits, a bounded queue).
"""

import functools
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from absl import flags
from etils import epath

from adapter_jax import bank as bank_lib
from adapter_jax import batching, cli, evaluation, export, glue_data, http_server, logs
from adapter_jax.errors import AdapterJaxError

FLAGS = flags.FLAGS
flags.DEFINE_list("adapters", None, "NAME=PATH,...: each task's export file, export folder or training workdir.")
flags.DEFINE_string("input", None, "Requests, one JSON object a line (batch job).")
flags.DEFINE_string("output", None, "Answers, one JSON object a line, in the order of --input.")
flags.DEFINE_integer("port", None, "Answer POSTed JSON lists over HTTP on this port instead (0: any free port).")
flags.DEFINE_string("host", "127.0.0.1", "The address to listen on; 0.0.0.0 for every interface.")
flags.DEFINE_float("read_timeout", 10.0, "Seconds a client has to send its whole request; then 408 and closed.",
                   lower_bound=0.1)
flags.DEFINE_integer("max_body_bytes", 4 << 20, "Largest request body taken (413 beyond).", lower_bound=1)
flags.DEFINE_integer("max_line_bytes", 1 << 20, "Longest --input line taken; a longer one gets an error answer.",
                     lower_bound=1)
flags.DEFINE_integer("max_queued", 1024, "Requests waiting to be answered at most; beyond, 503 at once.",
                     lower_bound=1)
flags.DEFINE_float("max_wait_ms", 5.0, "How long the first queued request waits for others to share its batch.",
                   lower_bound=0)
flags.DEFINE_integer("max_connections", 256, "Connections open at once; more are answered 503.", lower_bound=1)
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


# Lines of --input answered per call of `answer`: enough for the bank's large batches, few enough that memory
# stays flat however long the file.
LINES_PER_CALL = 4096


def error_answer(request_id: Any, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": message}


def _numbered_requests(lines: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, request, problem) for each non-blank line; problem (a line too long, not UTF-8, not JSON)
    is None where the line is a JSON value. A line over `max_line_bytes` is skipped without holding it whole."""
    for number in itertools.count(1):
        line = lines.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := lines.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield number, None, f"the line is longer than --max_line_bytes={max_line_bytes}"
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 ({e.reason} at byte {e.start})"
            continue
        if not text.strip():
            continue
        try:
            yield number, json.loads(text), None
        except json.JSONDecodeError as e:
            yield number, None, f"not valid JSON ({e})"


def answer_jsonl(
    bank: bank_lib.AdapterBank, input_path: epath.PathLike, output_path: epath.PathLike, *,
    max_line_bytes: int = 1 << 20,
) -> int:
    """Answers every non-blank line of `input_path` into `output_path`, a few thousand lines at a time; a line
    that cannot be answered gets an error naming its line. Returns the number of error answers."""
    errors = 0
    with epath.Path(input_path).open("rb") as lines, epath.Path(output_path).open("w", encoding="utf-8") as output:
        numbered = _numbered_requests(lines, max_line_bytes)
        while chunk := list(itertools.islice(numbered, LINES_PER_CALL)):
            answered = iter(answer(bank, [request for _, request, problem in chunk if problem is None]))
            for number, _, problem in chunk:
                line = next(answered) if problem is None else error_answer(None, problem)
                if "error" in line:
                    line["error"] = f"{input_path}:{number}: {line['error']}"
                    errors += 1
                output.write(json.dumps(line) + "\n")
    return errors

def parse_adapters(adapters: Sequence[str]) -> dict[str, str]:
    """NAME -> PATH of the --adapters items; a malformed item or a name given twice is refused."""
    paths: dict[str, str] = {}
    for item in adapters:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise AdapterJaxError(f"--adapters: {item!r} is not NAME=PATH")
        if name in paths:
            raise AdapterJaxError(f"--adapters: the name {name!r} is given twice, for {paths[name]} and {path}")
        paths[name] = path
    return paths


def load_bank(
    paths: Mapping[str, str], model: str | None, capacity: int, batch_sizes: Sequence[int]
) -> bank_lib.AdapterBank:
    """A bank holding the export at each name's path, sized to the largest of them."""
    exports = {name: export.read(path) for name, path in paths.items()}
    return bank_lib.AdapterBank.holding(exports, model, capacity=capacity, batch_sizes=batch_sizes)


def main(argv: list[str]) -> None:
    del argv
    with cli.exit_codes(OSError, ValueError):  # the files of --input and --output; ValueError: a --batch_sizes entry
        paths = parse_adapters(FLAGS.adapters)
        batch_sizes = [int(size) for size in FLAGS.batch_sizes]
        if FLAGS.port is None:
            bank = load_bank(paths, FLAGS.model, FLAGS.capacity, batch_sizes)
            errors = answer_jsonl(bank, FLAGS.input, FLAGS.output, max_line_bytes=FLAGS.max_line_bytes)
            print(f"answered {FLAGS.input} into {FLAGS.output} ({errors} error answers)", file=logs.console())
            return
        limits = http_server.Limits(FLAGS.read_timeout, FLAGS.max_body_bytes, FLAGS.max_connections)
        server = http_server.AnsweringServer(FLAGS.host, FLAGS.port, limits)  # a port in use fails before loading
        host, port = server.server_address[:2]
        print(f"listening on {host}:{port}; loading the adapters", file=logs.console(), flush=True)
        bank = load_bank(paths, FLAGS.model, FLAGS.capacity, batch_sizes)
    batcher = batching.Batcher(functools.partial(answer, bank), max_queued=FLAGS.max_queued,
                               max_batch=bank.batch_sizes[-1], max_wait=FLAGS.max_wait_ms / 1000)
    print(f"serving {', '.join(bank.names)} on port {port}", file=logs.console(), flush=True)
    server.serve(batcher)


if __name__ == "__main__":
    cli.run(main)
