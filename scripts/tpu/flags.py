"""The launcher's flags: parsing, checking, and what follows from them (TPU software version, number of hosts)."""

import argparse
import pathlib
import re
import shlex
from collections.abc import Callable, Sequence

from adapter_jax import tasks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
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
# One host carries at most 8 of the count an accelerator type ends with (cores on v2-v5p, chips on v5e/v6e);
# anything larger is a pod slice of several hosts.
_ONE_HOST_MAX = 8
# TPU VM names: lowercase letters, digits and hyphens, starting with a letter (a GCE resource name).
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
# v3-8, v4-32, v5litepod-8, v5p-8, v6e-8: generation, optional variant, then the number of cores or chips.
_ACCELERATOR = re.compile(r"v\d+[a-z]*-\d+")
GIT_URL = re.compile(r"(https?|ssh|git)://|git@")


def _checked(pattern: re.Pattern, what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not a valid {what}")
        return value

    return check


def _bucket(value: str) -> str:
    if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a GCS location; expected gs://BUCKET[/PREFIX] (bucket "
                                         "names are lowercase letters, digits, -, _ and .)")
    return value.rstrip("/")


def _glue_source(value: str) -> str:
    if value not in ("download", "tfds") and not value.startswith("gs://"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected 'download', 'tfds' or a gs:// folder holding the GLUE TSV layout (RTE/train.tsv, ...)")
    return value.rstrip("/")


def runtime_version(accelerator_type: str) -> str:
    """The TPU software version for JAX on `accelerator_type` (v4-8 -> tpu-ubuntu2204-base); KeyError if unknown."""
    return RUNTIME_VERSIONS[accelerator_type.rsplit("-", 1)[0]]


def is_pod(accelerator_type: str) -> bool:
    """Whether `accelerator_type` has several hosts (v4-16, v5litepod-16), whose ssh gcloud runs through an agent."""
    return int(accelerator_type.rsplit("-", 1)[1]) > _ONE_HOST_MAX


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


def _not_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 0")
    return int(value)


def _csv(value: str) -> str:
    if not re.fullmatch(r"[-+.,\w]+", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list")
    return value


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--repo", default=str(REPO_ROOT),
                        help="git URL to clone, or local git checkout whose tracked files are copied")
    parser.add_argument("--run_name", help="results go to gs://BUCKET/adapter-jax/RUN_NAME; default: --name")
    parser.add_argument("--local_out", type=pathlib.Path, help="where the report lands; default: ./tpu_runs/RUN_NAME")
    for grid_flag in ("modes", "learning_rates", "epochs", "adapter_sizes", "seeds"):
        parser.add_argument(f"--{grid_flag}", type=_csv, help="passed to scripts.sweep; default: its grid")
    parser.add_argument("--sweep_flags", default="", help="further flags for scripts.sweep, shell-quoted")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true",
                          help="Spot VM through a queued resource: much cheaper, may be preempted (then recreated)")
    capacity.add_argument("--preemptible", action="store_true", help="preemptible VM (the older kind of spot)")
    parser.add_argument("--max_recoveries", default=3, type=_not_negative,
                        help="how often a preempted VM is deleted, recreated and its sweeps restarted")
    parser.add_argument("--keep", action="store_true", help="do not delete the VM at the end, nor on failure")
    parser.add_argument("--attach", action="store_true",
                        help="poll a run this launcher started earlier (after Ctrl-C), then report and delete")
    parser.add_argument("--poll_seconds", default=300, type=_positive(float),
                        help="how often the detached sweeps are checked (one short ssh to worker 0 each time)")
    parser.add_argument("--ssh_retries", default=12, type=_positive(int),
                        help="failed polls in a row (gcloud or ssh failing) tolerated before the launcher stops "
                             "watching; the VM is then left running")
    parser.add_argument("--gcloud_retries", default=4, type=_not_negative,
                        help="retries, with backoff, of a failed step before the run starts")
    parser.add_argument("--dry_run", action="store_true", help="print every command, run nothing")
    return parser


def parse_flags(argv: Sequence[str], description: str = "") -> argparse.Namespace:
    """The launcher's flags; a bad value exits with a message naming the flag (argparse's usage error)."""
    parser = _parser(description)
    flags = parser.parse_args(argv)
    flags.argv = list(argv)
    flags.run_name = flags.run_name or flags.name
    if flags.runtime_version is None:
        try:
            flags.runtime_version = runtime_version(flags.accelerator_type)
        except KeyError:
            parser.error(f"--accelerator_type={flags.accelerator_type}: no TPU software version known for it; "
                         "pass --runtime_version")
    flags.local_out = flags.local_out or pathlib.Path("tpu_runs") / flags.run_name
    if not GIT_URL.match(flags.repo) and not pathlib.Path(flags.repo, "setup.py").is_file():
        parser.error(f"--repo={flags.repo}: neither a git URL nor a folder holding setup.py")
    try:
        shlex.split(flags.sweep_flags)
    except ValueError as e:
        parser.error(f"--sweep_flags: {e}")
    return flags
