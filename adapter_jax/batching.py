"""Dynamic batching: requests sent at the same time by different clients are answered by one call.

The server's handler threads `submit` their client's list of requests and wait on the returned future; one
worker thread takes what is queued, waits a short while (max_wait) for more, and answers the lot with one
call of `answer` (for the bank, one set of mixed forward passes), so that throughput under concurrent load is
that of the bank's large batches rather than of one request at a time. The queue holds at most `max_queued`
requests: beyond that `submit` refuses at once (the server answers 503) instead of letting latency grow.
"""

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

Answer = Callable[[Sequence[Any]], list[Any]]


class QueueFull(Exception):
    """The queue holds too many requests to take these; the message says how many."""


class Batcher:
    """One worker thread answering queued request lists together; `submit` from any thread.

    answer:     requests -> one answer per request, in order (called by the worker thread only).
    max_queued: requests waiting at most; a list that would exceed it is refused with QueueFull.
    max_batch:  requests the worker gathers for one call (a list longer than this is answered alone).
    max_wait:   seconds the worker waits for more requests after the first one arrives.
    """

    def __init__(self, answer: Answer, *, max_queued: int, max_batch: int, max_wait: float):
        self._answer = answer
        self.max_queued = max_queued
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._pending: collections.deque[tuple[Sequence[Any], concurrent.futures.Future]] = collections.deque()
        self._queued = 0  # requests in _pending
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._worker.start()

    def submit(self, requests: Sequence[Any]) -> concurrent.futures.Future:
        """A future of the answers to `requests`; QueueFull if the queue cannot take them now."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._changed:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._queued + len(requests) > self.max_queued:
                raise QueueFull(
                    f"{self._queued} requests are queued, at most {self.max_queued} may be; try again shortly"
                )
            self._pending.append((requests, future))
            self._queued += len(requests)
            self._changed.notify()
        return future

    @property
    def queued(self) -> int:
        """Requests waiting for the worker now."""
        with self._changed:
            return self._queued

    def close(self) -> None:
        """Stops the worker once the queue is empty."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join()

    def _take(self) -> list[tuple[Sequence[Any], concurrent.futures.Future]]:
        """The next lists to answer together: the first queued, and whatever arrives within max_wait that
        still fits in max_batch; [] once closed and empty."""
        with self._changed:
            while not self._pending and not self._closed:
                self._changed.wait()
            taken, rows = [], 0
            deadline = time.monotonic() + self._max_wait
            while True:
                while self._pending and (not taken or rows + len(self._pending[0][0]) <= self._max_batch):
                    requests, future = self._pending.popleft()
                    self._queued -= len(requests)
                    taken.append((requests, future))
                    rows += len(requests)
                left = deadline - time.monotonic()
                if self._pending or rows >= self._max_batch or left <= 0 or self._closed:
                    return taken
                self._changed.wait(left)

    def _work(self) -> None:
        while taken := self._take():
            requests = [request for part, _ in taken for request in part]
            try:
                answers = self._answer(requests)
            except Exception as e:  # noqa: BLE001 (each waiting handler reports it; the worker serves on)
                for _, future in taken:
                    future.set_exception(e)
                continue
            start = 0
            for part, future in taken:
                future.set_result(answers[start : start + len(part)])
                start += len(part)
