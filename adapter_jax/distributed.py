"""Start-up of a run over several processes: the hosts of a Cloud TPU pod, or processes named by flags.

Every entry point that trains or predicts calls `initialize` before anything touches a device:

- on Cloud TPU, `jax.distributed.initialize()` with no arguments: JAX finds the pod's hosts itself
  (a single-host TPU VM is a pod of one);
- anywhere (CPU, GPU clusters, tests), `--coordinator_address`, `--num_processes` and `--process_id`
  are passed to `jax.distributed.initialize`;
- otherwise nothing: one process.

A process that dies (killed, preempted) stops sending heartbeats; after HEARTBEAT_TIMEOUT_S the
coordination service ends the others with a message naming the cause, instead of their hanging in a
collective. `barrier` is the project's own synchronisation point, with a timeout for the same reason.
"""

import argparse
import itertools
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from jax.experimental import multihost_utils

from adapter_jax.errors import ConfigError, PeerLost

# JAX's default is 100 s; a dead host then costs every other host of the pod as long, billed.
HEARTBEAT_TIMEOUT_S = 30
BARRIER_TIMEOUT_S = 600  # a barrier waits for every host to finish what came before: loading a model, predicting
# Every process passes the same barriers in the same order, so a count makes their names agree and unique.
_barrier_count = itertools.count()

_HELP = {
    "coordinator_address": "host:port of process 0, where JAX's coordinator listens; with --num_processes and "
                           "--process_id, for clusters JAX does not detect itself (CPU, GPU, tests). "
                           "Leave all three out on Cloud TPU: JAX finds the pod's hosts.",
    "num_processes": "How many processes run this command (see --coordinator_address).",
    "process_id": "This process's number, 0 to --num_processes - 1; process 0 writes the run's files.",
}


def define_flags() -> None:
    """The three start-up flags, for an absl entry point."""
    flags.DEFINE_string("coordinator_address", None, _HELP["coordinator_address"])
    flags.DEFINE_integer("num_processes", None, _HELP["num_processes"], lower_bound=1)
    flags.DEFINE_integer("process_id", None, _HELP["process_id"], lower_bound=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The three start-up flags, for an argparse entry point."""
    parser.add_argument("--coordinator_address", help=_HELP["coordinator_address"])
    parser.add_argument("--num_processes", type=int, help=_HELP["num_processes"])
    parser.add_argument("--process_id", type=int, help=_HELP["process_id"])


def _on_cloud_tpu() -> bool:
    """Whether this is a Cloud TPU VM (or GKE TPU node). JAX decides it at import, from libtpu and the TPU
    chips it finds, without starting a backend, which would forbid jax.distributed.initialize; it has no
    public name for it."""
    from jax._src import cloud_tpu_init

    return cloud_tpu_init.running_in_cloud_tpu_vm


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins this process to the others of its run (see the module doc); the three values come together or not
    at all (ConfigError otherwise)."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if len(missing) == len(given):
        if _on_cloud_tpu():
            jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
        return
    if missing:
        raise ConfigError(f"{', '.join(missing)} missing: --coordinator_address, --num_processes and --process_id "
                          f"go together")
    if not process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must be below --num_processes={num_processes}")
    jax.distributed.initialize(**given, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def initialize_from_flags() -> None:
    """`initialize` with the values of the flags `define_flags` made."""
    initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)


def from_process_0(value: Any) -> Any:
    """Process 0's `value` (anything JSON holds) on every process, for a decision every process must take
    alike from what process 0 alone can see (the files it alone writes); the others' `value` is ignored."""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, data.size)] = data[:size]
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes())


def on_any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process of the run: every process gets the same answer."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches its `barrier(name)`; raises PeerLost if one does not within
    `timeout_s`, e.g. because it died or stopped on an error of its own."""
    if jax.process_count() == 1:
        return
    try:
        # Naming the processes makes orbax use the coordination service's barrier, which has a timeout; its
        # default, a collective, waits forever for a process that is gone.
        ocp.multihost.sync_global_processes(f"adapter_jax-{next(_barrier_count)}-{name}", timeout=timeout_s,
                                            processes=set(range(jax.process_count())))
    except jax.errors.JaxRuntimeError as e:
        raise PeerLost(f"not every process of the run reached {name!r} within {timeout_s} s (one died or stopped "
                       f"on an error of its own: see its log); stopping. Rerun every process to resume.") from e
