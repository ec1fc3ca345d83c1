r"""Runs the GLUE sweep on a Cloud TPU VM: create it, install, prepare data, sweep each task, report, delete it.
From the repository root:

    python -m scripts.tpu.launch --name=adapters-rte --zone=us-central2-b --accelerator_type=v4-8 \
        --project=my-project --bucket=gs://my-bucket --tasks=rte,mrpc --dry_run

--dry_run prints every gcloud command (a shell script you could run by hand) and runs nothing. Without it, each
command runs in turn, a failed one retried with backoff; the VM is deleted at the end, or when a step fails
before the run starts or the run itself fails, unless --keep. Results, checkpoints and the report live on the
bucket under gs://BUCKET/adapter-jax/RUN_NAME/, and the report is also copied to --local_out.

The sweeps run detached on every worker (setsid nohup), so a dropped ssh connection does not stop them; the
launcher polls worker 0 until they end, and the run's status comes from its own exit file alone: a failing
gcloud or ssh is retried with backoff and never deletes a VM whose run may still be going. A preempted spot VM
is deleted, recreated and set up again, and the same sweeps restart, resuming from the bucket (up to
--max_recoveries). Ctrl-C detaches: the VM and its run go on, and the launcher prints how to watch them again
(--attach), read the log, and delete the VM.

Every command is built by a pure function from the parsed flags, so tests check the sequence without gcloud.
"""

import argparse
import contextlib
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from scripts.tpu import gcloud, remote, ssh_agent
from scripts.tpu.flags import GIT_URL, is_pod, parse_flags
from scripts.tpu.gcloud import Runner, Step, StepError

Sleep = Callable[[float], None]
_QUEUED_WAIT_S = 30.0  # how often a queued resource is asked whether it is provisioned


class Detached(StepError):
    """The launcher stopped watching a run that may still be going: the VM is left running."""


def setup_steps(flags: argparse.Namespace) -> list[Step]:
    """Every command from a fresh VM to the detached sweeps, each safe to repeat."""
    sweeps = ", ".join(f"{t} in {remote.workdir(flags, t)}" for t in flags.tasks)
    return [
        remote.copy_project_step(flags),
        Step(f"make the Python {remote.PYTHON_VERSION} environment with the pinned versions on every worker, "
             "check the TPU", remote.install_command(flags)),
        *remote.data_steps(flags),
        Step(f"start the sweeps detached on every worker ({sweeps}); log in {remote.JOB_DIR}/log",
             remote.start_command(flags)),
    ]


def _poll_step(flags: argparse.Namespace) -> Step:
    return Step(f"wait for the sweeps: repeated every {flags.poll_seconds:g} s while its last line says running; "
                "`exit N` is the run's own status; no such line (gcloud or ssh failed) is retried with backoff",
                remote.poll_command(flags))


def render_script(flags: argparse.Namespace) -> str:
    """The whole sequence as a shell script: a comment before each command, each shell-quoted on one line."""
    steps = [Step(f"create the TPU VM {flags.name} ({flags.accelerator_type}, {flags.runtime_version})",
                  gcloud.create_command(flags))]
    if flags.spot:
        steps.append(Step(f"a queued resource: wait until `{shlex.join(gcloud.state_command(flags))}` prints ACTIVE; "
                          "when it prints SUSPENDED the VM was preempted: delete, create again, rerun what "
                          "follows (the sweeps resume from the bucket)", []))
    steps += [*setup_steps(flags), _poll_step(flags), *remote.report_steps(flags)]
    if flags.keep:
        steps.append(Step(f"--keep: the VM stays up; delete it later with "
                          f"{shlex.join(gcloud.delete_command(flags))}", []))
    else:
        steps.append(Step("delete the TPU VM (also when a step above failed)", gcloud.delete_command(flags)))
    return "\n".join(f"# {step.what}" + (f"\n{shlex.join(step.argv)}" if step.argv else "") for step in steps) + "\n"


def _create(flags: argparse.Namespace, run: Runner, sleep: Sleep) -> None:
    # Not retried: after a failed create, the name may belong to someone else's VM.
    gcloud.execute(Step(f"create the TPU VM {flags.name}", gcloud.create_command(flags)), run, sleep)
    if not flags.spot:
        return
    while (state := gcloud.state(flags, run)) not in gcloud.READY_STATES:
        if state == "FAILED":
            raise StepError(f"the queued resource {flags.name} failed: "
                            f"{shlex.join(gcloud.state_command(flags)[:-1])} tells why")
        print(f"# queued resource {flags.name}: {state or 'state unknown'}; asking again in {_QUEUED_WAIT_S:g} s",
              flush=True)
        sleep(_QUEUED_WAIT_S)


def _set_up(flags: argparse.Namespace, run: Runner, sleep: Sleep) -> None:
    if not GIT_URL.match(flags.repo):
        remote.stage_project(flags, run)
    for step in setup_steps(flags):
        gcloud.execute(step, run, sleep, flags.gcloud_retries)


def _recreate(flags: argparse.Namespace, run: Runner, sleep: Sleep, state: str, recovery: int) -> None:
    if recovery > flags.max_recoveries:
        raise StepError(f"{flags.name} was preempted ({state}) again, after --max_recoveries={flags.max_recoveries}")
    print(f"# {flags.name} was preempted ({state}): deleting and recreating it, then restarting the sweeps, which "
          f"resume from the bucket (recovery {recovery} of {flags.max_recoveries})", flush=True)
    gcloud.execute(Step("delete the preempted TPU VM", gcloud.delete_command(flags)), run, sleep,
                   flags.gcloud_retries)
    _create(flags, run, sleep)
    _set_up(flags, run, sleep)


def watch(flags: argparse.Namespace, run: Runner, sleep: Sleep) -> None:
    """Polls worker 0 until the detached run ends; recreates a preempted VM. Raises StepError when the run failed
    or vanished, Detached when gcloud failed more than --ssh_retries times in a row on a VM not preempted."""
    step = _poll_step(flags)
    gcloud.announce(step)
    failed_polls = recoveries = 0
    while True:
        polled = run(step.argv, capture_output=True, text=True)
        print((polled.stdout or "") + (polled.stderr or ""), end="", flush=True)
        status = remote.run_status(polled.stdout)
        if status is None:
            failed_polls += 1
            state = gcloud.state(flags, run)
            if state in gcloud.PREEMPTED_STATES:
                recoveries += 1
                _recreate(flags, run, sleep, state, recoveries)
                failed_polls = 0
                continue
            if failed_polls > flags.ssh_retries:
                raise Detached(f"cannot reach worker 0 of {flags.name}: {failed_polls} polls in a row failed "
                               f"(last exit {polled.returncode}, VM state {state or 'unknown'})")
            wait = min(flags.poll_seconds, gcloud.backoff_s(failed_polls))
            print(f"# poll failed (exit {polled.returncode}, VM state {state or 'unknown'}); the run's state is "
                  f"unknown, not failed: asking again in {wait:g} s", flush=True)
            sleep(wait)
            continue
        failed_polls = 0
        if status.running:
            sleep(flags.poll_seconds)
            continue
        if status.exit_code == 0:
            return
        run(remote.log_command(flags))  # shown to the user; its own status does not matter
        what = "vanished (killed, or the VM restarted)" if status.exit_code is None else \
            f"failed (exit {status.exit_code})"
        raise StepError(f"the sweeps {what}; their log is {remote.JOB_DIR}/log on each worker")


def _print_how_to_go_on(flags: argparse.Namespace) -> None:
    argv = [a for a in flags.argv if a not in ("--attach", "--dry_run")]
    attach = shlex.join([sys.executable, "-m", "scripts.tpu.launch", *argv, "--attach"])
    print(f"# detached: {flags.name} is still running (and billing), and so is its run, if it started.\n"
          f"# watch it again, then report and delete the VM:\n{attach}\n"
          f"# its log:\n{shlex.join(remote.log_command(flags, follow=True))}\n"
          f"# delete the VM:\n{shlex.join(gcloud.delete_command(flags))}", file=sys.stderr, flush=True)


def _delete(flags: argparse.Namespace, run: Runner, sleep: Sleep) -> bool:
    try:
        gcloud.execute(Step("delete the TPU VM", gcloud.delete_command(flags)), run, sleep, flags.gcloud_retries)
    except StepError as e:
        # Printed, not raised, so that a step that failed first stays the error the caller sees.
        print(f"error: {e}; the VM may still be running (and billing)", file=sys.stderr)
        return False
    return True


def launch(flags: argparse.Namespace, run: Runner = subprocess.run, sleep: Sleep = time.sleep) -> None:
    """Creates the VM (unless --attach), sets it up, starts and watches the run, reports, and deletes the VM
    unless --keep, also when a step fails; not when the launcher detaches (Ctrl-C, or gcloud failing for long)."""
    if not flags.attach:
        _create(flags, run, sleep)
    delete = not flags.keep
    try:
        pathlib.Path(flags.local_out).mkdir(parents=True, exist_ok=True)
        if not flags.attach:
            _set_up(flags, run, sleep)
        watch(flags, run, sleep)
        for step in remote.report_steps(flags):
            gcloud.execute(step, run, sleep, flags.gcloud_retries)
    except (Detached, KeyboardInterrupt):
        delete = False
        _print_how_to_go_on(flags)
        raise
    finally:
        if flags.keep:
            print(f"# --keep: {flags.name} is still running (and billing); delete it with\n"
                  f"{shlex.join(gcloud.delete_command(flags))}")
        deleted = _delete(flags, run, sleep) if delete else True
    if not deleted:
        raise StepError(f"could not delete {flags.name}; run {shlex.join(gcloud.delete_command(flags))}")


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(sys.argv[1:] if argv is None else argv, __doc__)
    if flags.dry_run:
        print(render_script(flags), end="")
        return 0
    agent = ssh_agent.gcloud_key_in_agent() if is_pod(flags.accelerator_type) else contextlib.nullcontext()
    try:
        with agent:
            launch(flags)
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
