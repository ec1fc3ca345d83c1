"""The project's exceptions: bad input raises an AdapterJaxError naming the file, line or key at fault;
a run that stops early raises NonFiniteLoss, PeerLost, Preempted or WriteFailed."""

import signal


class AdapterJaxError(Exception):
    """Base class of every error adapter-jax raises on bad input."""


class ConfigError(AdapterJaxError, ValueError):
    """A config key has a value that cannot work; the message names the key and what is allowed."""


class DataError(AdapterJaxError, ValueError):
    """A data file or folder is missing or malformed; the message names the path (and line)."""


class WeightsError(AdapterJaxError, ValueError):
    """A checkpoint folder or weights file is missing, mis-shaped or corrupt; the message names it."""


class CheckpointError(AdapterJaxError, ValueError):
    """A training checkpoint or adapter export cannot be used; the message says why."""


class WorkdirInUse(AdapterJaxError):
    """Another run holds the workdir's lock; the message names it (host, process id, start time)."""


class WriteFailed(Exception):
    """A file of the run could not be written (disk full, permission lost, bucket error); the message
    names the path and the reason."""


class NonFiniteLoss(Exception):
    """A step's loss or gradient was not finite and the config says to stop (on_nonfinite="stop")."""


class PeerLost(Exception):
    """Another process of a multi-process run did not reach a synchronisation point in time (it died, was
    preempted or stopped on an error of its own); the message names the point and the timeout."""


class Preempted(Exception):
    """A SIGTERM or SIGINT stopped training after the checkpoint of the current step was written (`step`), or
    stopped a run outside its training loop (step None: loading, compiling, predicting), its lock released."""

    def __init__(self, signum: int, step: int | None, workdir: object):
        self.signum = signum
        done = f"at step {step}; checkpoint written to {workdir}" if step is not None else f"({workdir} released)"
        super().__init__(f"stopped by {signal.Signals(signum).name} {done}. Rerun the same command to resume.")
