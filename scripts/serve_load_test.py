"""Load test of `python -m adapter_jax.serve --port` on loopback: many concurrent clients, some idle or slow.

Writes MiniLM exports for RTE and SST-2 (adapters 64, trained parameters = initial ones plus noise), answers
real dev sentences of both with the batch job (`--input`), then starts the server and measures, after a
warm-up that compiles its shapes: one client posting one request at a time, then `--clients` clients posting
`--rounds` one-request lists each at once while `--idle` clients hold connections open sending nothing and
`--slow` clients trickle their body a byte at a time. Every well-behaved request must be answered, with the
batch job's label. With --baseline_checkout (a checkout of another commit, e.g. `git archive main | tar -x -C
/tmp/main`), that commit's server is measured the same way beside it, without idle and slow clients when it
cannot bear them (--baseline_misbehaving=false). From the repository root:

    python -m scripts.serve_load_test [--clients=64 --rounds=4 --idle=4 --slow=4 --baseline_checkout=/tmp/main]
"""

import collections
import concurrent.futures
import dataclasses
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from adapter_jax import benchmarking

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 64, "Well-behaved clients posting at the same time.")
flags.DEFINE_integer("rounds", 4, "One-request lists each well-behaved client posts, one after another.")
flags.DEFINE_integer("idle", 4, "Clients that connect and send nothing, reconnecting whenever the server closes.")
flags.DEFINE_integer("slow", 4, "Clients that send their body one byte every --slow_interval seconds.")
flags.DEFINE_float("slow_interval", 0.5, "Seconds between the bytes of a slow client.")
flags.DEFINE_integer("sequential", 32, "Requests of the one-client, one-at-a-time figure.")
flags.DEFINE_string("baseline_checkout", None, "A checkout of another commit whose server is measured beside.")
flags.DEFINE_bool("baseline_misbehaving", False, "Send idle and slow clients to the baseline server too.")
flags.DEFINE_string("glue_dir", os.environ.get("GLUE_DIR", str(REPO_ROOT.parent / "shared" / "data" / "glue")),
                    "GLUE folder (RTE and SST-2 dev sentences are posted).")


@dataclasses.dataclass
class LoadResult:
    """What the well-behaved clients got, and what the idle and slow ones met."""

    seconds: float  # from the first request sent to the last answer
    latencies: list[float]  # of each answered request, in seconds
    answers: dict[Any, dict]  # request id -> answer
    failures: list[str]  # well-behaved requests not answered 200
    misbehaving: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        p50, p99 = np.percentile(self.latencies, [50, 99]) * 1000 if self.latencies else (float("nan"),) * 2
        return (f"{len(self.answers)} answered, {len(self.failures)} not, {len(self.answers) / self.seconds:6.1f} "
                f"requests/s, latency p50 {p50:6.0f} ms p99 {p99:6.0f} ms")


def post(port: int, requests: Sequence[Any], timeout: float = 120.0) -> tuple[int, Any]:
    """POSTs a JSON list; the status and the decoded answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/", body=json.dumps(list(requests)), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _well_behaved(
    port: int, requests: Sequence[dict], timeout: float, result: LoadResult, lock: threading.Lock
) -> None:
    for request in requests:
        start = time.perf_counter()
        try:
            status, payload = post(port, [request], timeout)
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            status, payload = None, repr(e)
        with lock:
            if status == 200:
                result.latencies.append(time.perf_counter() - start)
                result.answers[request["id"]] = payload[0]
            else:
                result.failures.append(f"{request['id']}: {status} {payload}")


def _misbehaving(
    port: int, kind: str, body: bytes, interval: float, stop: threading.Event, result: LoadResult
) -> None:
    """Holds a connection open (idle: sending nothing; slow: a byte at a time) until the server closes it or the
    test ends, then connects again; counts how each connection ended."""
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.settimeout(0.05)
            if kind == "slow":
                connection.sendall(b"POST / HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body))
            sent, reply, next_byte = 0, b"", time.monotonic()
            while not stop.is_set():
                if kind == "slow" and sent < len(body) and time.monotonic() >= next_byte:
                    connection.sendall(body[sent : sent + 1])
                    sent, next_byte = sent + 1, next_byte + interval
                try:
                    chunk = connection.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                reply += chunk
            if reply:
                ended = reply.split(b"\r\n", 1)[0].decode(errors="replace")
            else:
                ended = "still open at the end" if stop.is_set() else "closed without an answer"
            result.misbehaving[f"{kind}: {ended}"] += 1


def load(
    port: int, requests: Sequence[dict], *, clients: int, idle: int = 0, slow: int = 0, slow_interval: float = 0.5,
    timeout: float = 120.0,
) -> LoadResult:
    """`requests` dealt round-robin to `clients` concurrent clients, each posting its share one at a time and
    waiting `timeout` seconds at most for each answer, while `idle` and `slow` misbehaving clients (a byte every
    `slow_interval` seconds) keep connections open."""
    result = LoadResult(0.0, [], {}, [])
    lock, stop = threading.Lock(), threading.Event()
    body = json.dumps([requests[0]]).encode()
    others = [threading.Thread(target=_misbehaving, args=(port, kind, body, slow_interval, stop, result), daemon=True)
              for kind in ["idle"] * idle + ["slow"] * slow]
    for thread in others:
        thread.start()
    time.sleep(0.5 if others else 0)  # the misbehaving connections are open before the load starts
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        shares = [pool.submit(_well_behaved, port, requests[i::clients], timeout, result, lock) for i in range(clients)]
        for share in shares:
            share.result()
    result.seconds = time.perf_counter() - start
    stop.set()
    for thread in others:
        thread.join(10)
    return result


def warm_up(port: int, requests: Sequence[dict], largest_batch: int = 64) -> None:
    """Compiles the server's shapes: single requests and full batches across the range of lengths."""
    by_length = sorted(requests, key=lambda r: len(r["sentence1"]) + len(r.get("sentence2", "")))
    for group in np.array_split(np.arange(len(by_length)), 4):
        lists = [[by_length[group[0]]], [by_length[group[-1]]], [by_length[group[i % len(group)]]
                                                                 for i in range(largest_batch)]]
        for requests_list in lists:
            status, payload = post(port, requests_list)
            assert status == 200, payload


def _requests(glue_dir: str, count: int) -> list[dict]:
    from adapter_jax import glue_data, tasks

    per_task = []
    for name in ("rte", "sst2"):
        examples = glue_data.read_examples(tasks.get_task(name), "dev", glue_dir=glue_dir)[: (count + 1) // 2]
        per_task.append([{"id": f"{name}:{e.idx}", "task": name, "sentence1": e.text_a,
                          **({} if e.text_b is None else {"sentence2": e.text_b})} for e in examples])
    return [request for pair in zip(*per_task, strict=True) for request in pair][:count]


def _write_exports(folder: pathlib.Path) -> str:
    """--adapters for MiniLM exports of RTE and SST-2 whose parameters are the initial ones plus noise."""
    import jax

    from adapter_jax import experiment, export
    from configs import glue

    rng, items = np.random.default_rng(0), []
    for name in ("rte", "sst2"):
        config = glue.get_config(name)
        config.adapter_size = 64
        setup = experiment.build(config)
        trained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.01, np.shape(x)).astype(np.float32),
                               setup.trainable_params)
        items.append(f"{name}={export.write(folder / name, trained, export.metadata(setup))}")
    return "--adapters=" + ",".join(items)


def start_server(checkout: pathlib.Path, arguments: Sequence[str]) -> tuple[subprocess.Popen, int]:
    """`python -m adapter_jax.serve` of `checkout` on a free port; the process and the port, once it serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    server = subprocess.Popen([sys.executable, "-m", "adapter_jax.serve", *arguments, f"--port={port}"],
                              cwd=checkout, env=environment, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("serving"):
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keeps the pipe from filling
            return server, port
    raise RuntimeError(f"the server of {checkout} stopped (exit status {server.wait()})")


def _measure(label: str, checkout: pathlib.Path, adapters: str, requests: list[dict], expected: dict,
             misbehaving: bool) -> None:
    server, port = start_server(checkout, [adapters])
    try:
        warm_up(port, requests)
        sequential = load(port, requests[: FLAGS.sequential], clients=1)
        concurrent_load = load(port, requests, clients=FLAGS.clients, idle=FLAGS.idle if misbehaving else 0,
                               slow=FLAGS.slow if misbehaving else 0, slow_interval=FLAGS.slow_interval)
    finally:
        server.terminate()
        server.wait(30)
    for name, result in (("1 client", sequential), (f"{FLAGS.clients} clients", concurrent_load)):
        print(f"{label}, {name}: {result.summary()}")
        labels_differ = [i for i, answer in result.answers.items() if answer["label"] != expected[i]["label"]]
        drift = max(np.max(np.abs(np.subtract(answer["logits"], expected[i]["logits"])))
                    for i, answer in result.answers.items())
        print(f"    labels as the batch job's: {len(result.answers) - len(labels_differ)}/{len(result.answers)}; "
              f"largest logit difference {drift:.2g}; failures: {result.failures[:3]}")
    if concurrent_load.misbehaving:
        print(f"    idle and slow clients: {dict(concurrent_load.misbehaving)}")


def main(argv: list[str]) -> None:
    del argv
    requests = _requests(FLAGS.glue_dir, FLAGS.clients * FLAGS.rounds)
    print(f"CPU: {benchmarking.cpu_description()}; MiniLM, RTE + SST-2 adapters of size 64; {len(requests)} real dev "
          f"requests; {FLAGS.clients} clients x {FLAGS.rounds} one-request posts; {FLAGS.idle} idle, "
          f"{FLAGS.slow} slow clients")
    with tempfile.TemporaryDirectory() as folder:
        adapters = _write_exports(pathlib.Path(folder))
        input_path, output_path = pathlib.Path(folder, "requests.jsonl"), pathlib.Path(folder, "answers.jsonl")
        input_path.write_text("".join(json.dumps(request) + "\n" for request in requests))
        subprocess.run([sys.executable, "-m", "adapter_jax.serve", adapters, f"--input={input_path}",
                        f"--output={output_path}"], cwd=REPO_ROOT, check=True, capture_output=True)
        expected = {answer["id"]: answer for answer in map(json.loads, output_path.read_text().splitlines())}
        _measure("this server", REPO_ROOT, adapters, requests, expected, misbehaving=True)
        if FLAGS.baseline_checkout:
            _measure(f"server of {FLAGS.baseline_checkout}", pathlib.Path(FLAGS.baseline_checkout), adapters,
                     requests, expected, misbehaving=FLAGS.baseline_misbehaving)


if __name__ == "__main__":
    app.run(main)
