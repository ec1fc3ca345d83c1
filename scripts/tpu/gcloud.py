"""gcloud's commands for one TPU VM (create, describe, ssh, scp, delete), and running them with retries.

Spot VMs are created through a queued resource, Google's recommended path for spot and pods: the request waits
for capacity instead of failing, and a preempted VM shows as a SUSPENDED queued resource (its node PREEMPTED).
"""

import argparse
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Runner = Callable[..., subprocess.CompletedProcess]
# States in which the VM (or its queued resource) will never run the sweeps again: it must be recreated.
PREEMPTED_STATES = frozenset({"PREEMPTED", "TERMINATED", "SUSPENDING", "SUSPENDED", "FAILED"})
# A queued resource is provisioned when ACTIVE; a TPU VM is usable when READY.
READY_STATES = frozenset({"ACTIVE", "READY"})
BACKOFF_FIRST_S, BACKOFF_MAX_S = 10.0, 300.0


@dataclass(frozen=True)
class Step:
    """One command of the sequence; `what` is printed before it and named when it fails."""

    what: str
    argv: list[str]


class StepError(RuntimeError):
    """A command of the sequence failed; the message names the step and its command."""


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): doubling from BACKOFF_FIRST_S, capped."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))


def _compute_tpus(flags: argparse.Namespace, kind: str, verb: str, positional: Sequence[str], *args: str) -> list[str]:
    project = [f"--project={flags.project}"] if flags.project else []
    return ["gcloud", "compute", "tpus", kind, verb, *positional, f"--zone={flags.zone}", *project, *args]


def tpu_vm(flags: argparse.Namespace, verb: str, positional: Sequence[str], *args: str) -> list[str]:
    return _compute_tpus(flags, "tpu-vm", verb, positional, *args)


def ssh(flags: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    """Runs a shell `command` on the VM's workers (all of them, or one index), from the ssh user's home.

    Multi-host slices (e.g. v4-32) need the same JAX program on every worker at once, hence worker=all.
    """
    # Keepalives let an hours-long sweep survive idle NAT timeouts between log lines.
    return tpu_vm(flags, "ssh", [flags.name], f"--worker={worker}", "--ssh-flag=-oServerAliveInterval=60",
                  f"--command={command}")


def scp_to_workers(flags: argparse.Namespace, source: str, destination: str) -> list[str]:
    return tpu_vm(flags, "scp", [source, f"{flags.name}:{destination}"], "--recurse", "--worker=all")


def create_command(flags: argparse.Namespace) -> list[str]:
    if flags.spot:  # the queued resource takes the VM's name, and its node is the VM
        return _compute_tpus(flags, "queued-resources", "create", [flags.name], f"--node-id={flags.name}",
                             f"--accelerator-type={flags.accelerator_type}",
                             f"--runtime-version={flags.runtime_version}", "--spot")
    capacity = ["--preemptible"] if flags.preemptible else []
    return tpu_vm(flags, "create", [flags.name], f"--accelerator-type={flags.accelerator_type}",
                  f"--version={flags.runtime_version}", *capacity)


def state_command(flags: argparse.Namespace) -> list[str]:
    """Prints the VM's state (READY, PREEMPTED, ...), or its queued resource's (ACTIVE, SUSPENDED, ...)."""
    if flags.spot:
        return _compute_tpus(flags, "queued-resources", "describe", [flags.name], "--format=value(state.state)")
    return tpu_vm(flags, "describe", [flags.name], "--format=value(state)")


def delete_command(flags: argparse.Namespace) -> list[str]:
    if flags.spot:  # --force deletes the queued resource's node (the VM) too
        return _compute_tpus(flags, "queued-resources", "delete", [flags.name], "--force", "--quiet")
    return tpu_vm(flags, "delete", [flags.name], "--quiet")


def state(flags: argparse.Namespace, run: Runner) -> str | None:
    """The VM's state as gcloud describes it now, or None when gcloud cannot tell (an API error, no network)."""
    described = run(state_command(flags), capture_output=True, text=True)
    lines = (described.stdout or "").split()
    return lines[-1] if described.returncode == 0 and lines else None


def announce(step: Step) -> None:
    print(f"# {step.what}\n{shlex.join(step.argv)}", flush=True)


def execute(step: Step, run: Runner, sleep: Callable[[float], None], retries: int = 0) -> None:
    """Runs `step`, retried up to `retries` times with backoff (every step before the run starts can be
    repeated: each one skips what is done); StepError when it still fails."""
    announce(step)
    returncode = run(step.argv).returncode
    for attempt in range(1, retries + 1):
        if returncode == 0:
            return
        wait = backoff_s(attempt)
        print(f"# failed (exit {returncode}); retry {attempt} of {retries} in {wait:g} s", flush=True)
        sleep(wait)
        returncode = run(step.argv).returncode
    if returncode == 0:
        return
    raise StepError(f"step '{step.what}' failed (exit {returncode}): {shlex.join(step.argv)}")
