"""SIGTERM (sent before a TPU VM is preempted) and SIGINT: a flag the training loop polls, agreed on by every
process of a pod; anywhere else while a workdir is locked (loading, compiling, predicting), an exception, so that
every `with` on the way out releases what it holds."""

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from adapter_jax.errors import Preempted

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# A signal `raised` turned into Preempted, until its block ends: an exception raised in a signal handler is lost
# where the handler happens to run inside a callback that swallows it (JAX's garbage-collection hook).
_pending: int | None = None


@contextlib.contextmanager
def raised(workdir: epath.PathLike) -> Iterator[None]:
    """While in the block, SIGTERM and SIGINT raise Preempted (naming `workdir`) in the main thread, where Python
    runs signal handlers; one whose exception was swallowed is raised when the block ends, and stops the training
    loop at its first step (StopSignals, which inside turns the signals into its flag). Outside the main thread,
    nothing: a handler can be set there alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        global _pending
        _pending = signum
        raise Preempted(signum, None, workdir)

    global _pending
    previous = {s: signal.signal(s, handle) for s in _SIGNALS}
    try:
        yield
        if _pending is not None:
            raise Preempted(_pending, None, workdir)
    finally:
        _pending = None
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop polls, while in its `with` block."""

    def __init__(self):
        self.received: int | None = _pending

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def stop_requested(self, step: int, every_steps: int) -> bool:
        """Whether to stop after `step`. On a pod, all hosts must save the same step, so they agree
        every `every_steps` steps: a signal that reached any host stops them all."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % every_steps:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.received is not None)).any())

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
