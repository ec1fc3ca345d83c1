"""SIGTERM (sent before a TPU VM is preempted) and SIGINT as a flag the training loop polls, agreed on by
every process of a pod."""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop polls, while in its `with` block."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
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
