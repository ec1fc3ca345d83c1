"""The batcher and the HTTP server around it, with a stand-in for the bank: concurrent lists are answered in one
call, and a full queue is answered 503 at once while the requests already taken are answered."""

import http.client
import json
import socket
import threading

import pytest

from adapter_jax import batching, http_server


class BlockingAnswer:
    """Answers each request with its own value doubled, once released; records the lists it was called with."""

    def __init__(self):
        self.calls: list[list] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, requests):
        self.calls.append(list(requests))
        self.started.set()
        assert self.release.wait(30)
        return [2 * request for request in requests]


def test_lists_queued_together_are_answered_in_one_call():
    answer = BlockingAnswer()
    batcher = batching.Batcher(answer, max_queued=10, max_batch=8, max_wait=0.001)
    first = batcher.submit([1])
    assert answer.started.wait(30)  # the worker is busy with [1]; the next lists wait together
    second, third = batcher.submit([2, 3]), batcher.submit([4])
    answer.release.set()
    assert (first.result(30), second.result(30), third.result(30)) == ([2], [4, 6], [8])
    assert answer.calls == [[1], [2, 3, 4]]
    batcher.close()


def test_a_list_that_overfills_the_queue_is_refused_at_once():
    answer = BlockingAnswer()
    batcher = batching.Batcher(answer, max_queued=3, max_batch=8, max_wait=0.001)
    batcher.submit([1])
    assert answer.started.wait(30)
    waiting = batcher.submit([2, 3])
    with pytest.raises(batching.QueueFull, match="2 requests are queued, at most 3"):
        batcher.submit([4, 5])
    answer.release.set()
    assert waiting.result(30) == [4, 6]
    batcher.close()


def _post(port, body):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/", body=json.dumps(body))
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_http_answers_503_when_the_queue_is_full_and_serves_the_rest():
    answer = BlockingAnswer()
    batcher = batching.Batcher(answer, max_queued=2, max_batch=8, max_wait=0.001)
    server = http_server.AnsweringServer("127.0.0.1", 0, http_server.Limits(5, 1000, 8))
    threading.Thread(target=server.serve, args=(batcher,), daemon=True).start()
    port = server.server_address[1]
    try:
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", _post(port, [1])))
        first.start()
        assert answer.started.wait(30)
        second = threading.Thread(target=lambda: results.setdefault("second", _post(port, [2, 3])))
        second.start()
        while batcher.queued < 2:  # the second list is waiting in the queue
            second.join(0.01)
        status, payload = _post(port, [4])
        assert status == 503 and "at most 2 may be" in payload["error"]
        assert _post(port, [5, 6, 7]) == (413, {"error": "the body holds 3 requests; at most 2 are taken at once"})
        answer.release.set()
        first.join(30), second.join(30)
        assert results == {"first": (200, [2]), "second": (200, [4, 6])}
    finally:
        answer.release.set()
        server.shutdown()
        server.server_close()
        batcher.close()


def test_a_connection_beyond_the_limit_is_answered_503_while_the_others_stay_served():
    batcher = batching.Batcher(lambda requests: list(requests), max_queued=8, max_batch=8, max_wait=0.001)
    server = http_server.AnsweringServer("127.0.0.1", 0, http_server.Limits(2, 1000, 1))
    threading.Thread(target=server.serve, args=(batcher,), daemon=True).start()
    port = server.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as idle:  # holds the one connection allowed
            with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.0 503 ")
            idle.settimeout(30)
            assert idle.recv(1) == b""  # closed after the read timeout, freeing its place
        assert _post(port, [1]) == (200, [1])
    finally:
        server.shutdown()
        server.server_close()
        batcher.close()
