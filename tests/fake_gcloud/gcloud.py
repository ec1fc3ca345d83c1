"""A stand-in `gcloud` for the launcher's tests: the commands scripts/tpu runs, on this machine.

`install(bin_dir, state_dir)` puts an executable `gcloud` in bin_dir (put it first on PATH). It keeps each TPU VM
(and queued resource) in state_dir/vms/NAME.json; a VM's workers are folders, state_dir/vms/NAME-gGEN/worker-I
(GEN counts the VM's creations), each the ssh user's home. `ssh --command` runs the command there with bash, in a
UTS namespace of its own whose hostname is NAME-gGEN-wI (so a recreated VM has new hostnames, as on Cloud TPU);
`scp` copies into it; `storage cp/rsync` copy between local folders and gs:// (the storage emulator named by
STORAGE_EMULATOR_HOST). Every call is recorded in state_dir/calls.jsonl with its exit status.

Each worker is a stand-in TPU VM image: `python3` there only makes virtual environments (uv's commands, offline:
the environment's python is this one), and JAX finds the VM's hosts as on a TPU pod (TPU_WORKER_HOSTNAMES,
TPU_WORKER_ID), with FAKE_TPU_CHIPS_PER_WORKER CPU devices each (default 2); its TMPDIR is its own; with
FAKE_TPU_STEP_SECONDS set, every training step takes that long more.

Faults: `fail(state_dir, match, times, code)` makes the next `times` calls whose command line contains `match`
exit `code` without running (1: an API error; 255: ssh cannot connect); `preempt(state_dir, name)` kills every
process of the VM's workers and leaves it PREEMPTED (its queued resource SUSPENDED), as a spot preemption does.
Like gcloud's `VerifyKeyInAgent`, ssh or scp to every worker of a VM of several workers needs gcloud's key
(~/.ssh/google_compute_engine) in an ssh-agent: with no agent it warns "Command may stall" and stalls; with an
agent that lacks the key it fails with SSHKeyNotInAgent.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

IMAGE_PYTHON3 = r'''#!/bin/bash
# The stand-in image's python3: uv's commands work offline (the environment's python is the tests' own).
if [ "$1 $2" = "-m pip" ]; then exit 0; fi
if [ "$1 $2 $3" = "-m uv venv" ]; then
  target="${@: -1}"; mkdir -p "$target/bin"
  ln -sf "%(image)s/venv-python" "$target/bin/python"; exit 0
fi
if [ "$1 $2 $3" = "-m uv pip" ]; then exit 0; fi
exec "%(python)s" "$@"
'''
# The environment's python: the tests' own; `jax.devices("tpu")` (the install's check) asks for this VM's devices.
# FAKE_TPU_STEP_SECONDS slows every training step (slow_steps.py), for a test that must act mid-run.
VENV_PYTHON = r'''#!/bin/bash
if [ "$1" = "-m" ] && [ -n "$FAKE_TPU_STEP_SECONDS" ]; then exec "%(python)s" "%(slow_steps)s" "$@"; fi
if [ "$1" = "-c" ]; then code="${2//jax.devices(\"tpu\")/jax.devices()}"; shift 2; exec "%(python)s" -c "$code" "$@"; fi
exec "%(python)s" "$@"
'''
WRAPPER = '#!/bin/sh\nexec "%(python)s" "%(script)s" "$@"\n'


def install(bin_dir: pathlib.Path, state_dir: pathlib.Path) -> None:
    """An executable `gcloud` in bin_dir that keeps its state in state_dir (which it makes)."""
    image = state_dir / "image"
    (image / "bin").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    here = pathlib.Path(__file__).resolve().parent
    values = {"python": sys.executable, "image": image, "script": here / "gcloud.py",
              "slow_steps": here / "slow_steps.py"}
    for path, text in ((image / "bin" / "python3", IMAGE_PYTHON3), (image / "venv-python", VENV_PYTHON),
                       (bin_dir / "gcloud", WRAPPER)):
        path.write_text(text % values)
        path.chmod(0o755)
    (state_dir / "vms").mkdir(exist_ok=True)


def _state_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["FAKE_GCLOUD_STATE"])


@contextlib.contextmanager
def _locked(state_dir: pathlib.Path):
    with open(state_dir / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _vm_file(state_dir: pathlib.Path, name: str) -> pathlib.Path:
    return state_dir / "vms" / f"{name}.json"


def vm(state_dir: pathlib.Path, name: str) -> dict | None:
    """The VM's record (state, workers, generation, ...), or None when there is no such VM."""
    path = _vm_file(state_dir, name)
    return json.loads(path.read_text()) if path.exists() else None


def _save(state_dir: pathlib.Path, name: str, record: dict | None) -> None:
    path = _vm_file(state_dir, name)
    if record is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(record))


def worker_home(state_dir: pathlib.Path, name: str, record: dict, worker: int) -> pathlib.Path:
    return state_dir / "vms" / f"{name}-g{record['generation']}" / f"worker-{worker}"


def calls(state_dir: pathlib.Path) -> list[dict]:
    """Every call so far: {"argv": [...], "code": exit status}."""
    path = state_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fail(state_dir: pathlib.Path, match: str, times: int, code: int) -> None:
    with _locked(state_dir):
        path = state_dir / "faults.json"
        faults = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*faults, {"match": match, "times": times, "code": code}]))


def _injected_fault(state_dir: pathlib.Path, command_line: str) -> int | None:
    path = state_dir / "faults.json"
    with _locked(state_dir):
        faults = json.loads(path.read_text()) if path.exists() else []
        for fault in faults:
            if fault["times"] > 0 and fault["match"] in command_line:
                fault["times"] -= 1
                path.write_text(json.dumps(faults))
                return fault["code"]
    return None


def _worker_processes(tag: str) -> list[int]:
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FAKE_GCLOUD_WORKER={tag}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _kill_workers(state_dir: pathlib.Path, name: str, record: dict) -> None:
    for _ in range(50):  # a process may start another while we kill: until none is left
        pids = _worker_processes(f"{state_dir}/{name}-g{record['generation']}")
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def preempt(state_dir: pathlib.Path, name: str) -> None:
    """What a spot preemption does: every process of the VM's workers ends at once, and the VM is PREEMPTED."""
    with _locked(state_dir):
        record = vm(state_dir, name)
        record["state"] = "PREEMPTED"
        _save(state_dir, name, record)
    _kill_workers(state_dir, name, record)


def _option(args: list[str], name: str, default: str | None = None) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def _positional(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("--")]


def _create(state_dir: pathlib.Path, name: str, args: list[str], queued: bool) -> int:
    with _locked(state_dir):
        old = vm(state_dir, name)
        if old is not None:
            print(f"ERROR: (gcloud.compute.tpus) ALREADY_EXISTS: {name}", file=sys.stderr)
            return 1
        count = int(_option(args, "accelerator-type").rsplit("-", 1)[1])
        generations = state_dir / "vms" / f"{name}.generations"
        generation = int(generations.read_text()) + 1 if generations.exists() else 1
        generations.write_text(str(generation))
        record = {"state": "READY", "workers": max(1, count // 8), "generation": generation, "queued": queued,
                  "spot": "--spot" in args, "accelerator_type": _option(args, "accelerator-type")}
        for worker in range(record["workers"]):
            (worker_home(state_dir, name, record, worker) / "tmp").mkdir(parents=True)
        _save(state_dir, name, record)
    return 0


def _delete(state_dir: pathlib.Path, name: str) -> int:
    record = vm(state_dir, name)
    if record is None:
        print(f"ERROR: (gcloud.compute.tpus) NOT_FOUND: {name}", file=sys.stderr)
        return 1
    _kill_workers(state_dir, name, record)
    with _locked(state_dir):
        _save(state_dir, name, None)
    return 0


def _describe(state_dir: pathlib.Path, name: str, queued: bool) -> int:
    record = vm(state_dir, name)
    if record is None:
        print(f"ERROR: (gcloud.compute.tpus) NOT_FOUND: {name}", file=sys.stderr)
        return 1
    suspended = {"PREEMPTED": "SUSPENDED", "READY": "ACTIVE"}
    print(suspended.get(record["state"], record["state"]) if queued else record["state"])
    return 0


def _key_in_agent_or_stall(record: dict, worker: str) -> int:
    """gcloud's VerifyKeyInAgent, for a command to every worker of several."""
    if worker != "all" or record["workers"] == 1:
        return 0
    key = pathlib.Path("~/.ssh/google_compute_engine").expanduser()
    if not os.environ.get("SSH_AUTH_SOCK"):
        print("WARNING: ssh-agent not found. Command may stall.", file=sys.stderr, flush=True)
        time.sleep(3600)  # every worker's ssh asks for the key's passphrase, and nobody answers
        return 255
    listed = subprocess.run(["ssh-add", "-l"], capture_output=True, text=True, check=False).stdout
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True, text=True,
                                 check=False).stdout.split()
    if not fingerprint or fingerprint[1] not in listed:
        print(f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) SSHKeyNotInAgent: The SSH key is not in the SSH agent. "
              f"Please run ssh-add {key}", file=sys.stderr)
        return 1
    return 0


def _workers(record: dict, worker: str) -> list[int]:
    return list(range(record["workers"])) if worker == "all" else [int(worker)]


def _ready_vm(state_dir: pathlib.Path, name: str) -> dict | None:
    record = vm(state_dir, name)
    if record is None:
        print(f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) NOT_FOUND: {name}", file=sys.stderr)
    elif record["state"] != "READY":
        print(f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) TPUInUnusableTerminalState: {name} is {record['state']}",
              file=sys.stderr)
        return None
    return record


def _worker_env(state_dir: pathlib.Path, name: str, record: dict, worker: int) -> dict[str, str]:
    chips = os.environ.get("FAKE_TPU_CHIPS_PER_WORKER", "2")
    return {
        **os.environ, "HOME": str(worker_home(state_dir, name, record, worker)),
        "PATH": f"{state_dir / 'image' / 'bin'}:{os.environ['PATH']}",
        "FAKE_GCLOUD_WORKER": f"{state_dir}/{name}-g{record['generation']}",
        "TMPDIR": str(worker_home(state_dir, name, record, worker) / "tmp"),  # each VM has a /tmp of its own
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={chips}",
        # What a TPU VM's metadata tells JAX: this host's number and every host of the slice (JAX's GKE path).
        "JAX_FORCE_TPU_INIT": "1", "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "MEGASCALE_NUM_SLICES": "1",
        "MEGASCALE_SLICE_ID": "0", "MEGASCALE_COORDINATOR_ADDRESS": "localhost",
        "TPU_WORKER_HOSTNAMES": ",".join(["localhost"] * record["workers"]), "TPU_WORKER_ID": str(worker),
    }


def _reach(state_dir: pathlib.Path, name: str, args: list[str]) -> tuple[dict | None, list[int], int]:
    """The VM's record and the workers --worker names, as ssh and scp reach them; or an exit status (no record)."""
    record = _ready_vm(state_dir, name)
    if record is None:
        return None, [], 1
    worker = _option(args, "worker", "0")
    refused = _key_in_agent_or_stall(record, worker)
    return (None, [], refused) if refused else (record, _workers(record, worker), 0)


def _ssh(state_dir: pathlib.Path, name: str, args: list[str]) -> int:
    record, workers, refused = _reach(state_dir, name, args)
    if record is None:
        return refused
    command = _option(args, "command")
    processes = []
    for index in workers:
        hostname = f"{name}-g{record['generation']}-w{index}"
        env = _worker_env(state_dir, name, record, index)
        # The worker resolves its own hostname (gloo, JAX's CPU collectives, looks it up), as a VM does.
        hosts = worker_home(state_dir, name, record, index).with_name(f"hosts-{index}")
        hosts.write_text(f"{pathlib.Path('/etc/hosts').read_text()}\n127.0.0.1 {hostname}\n")
        processes.append(subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--uts", "--mount", "bash", "-c",
             f"hostname {hostname} && mount --bind {hosts} /etc/hosts && cd \"$HOME\" && {{ {command}\n}}"],
            env=env, stdin=subprocess.DEVNULL))
    codes = [process.wait() for process in processes]
    return next((code for code in codes if code), 0)


def _scp(state_dir: pathlib.Path, args: list[str]) -> int:
    source, target = _positional(args)
    name, destination = target.split(":", 1)
    record, workers, refused = _reach(state_dir, name, args)
    if record is None:
        return refused
    for index in workers:
        shutil.copytree(source, worker_home(state_dir, name, record, index) / destination, dirs_exist_ok=True)
    return 0


def _files(folder) -> list:
    """Every file under `folder` (epath globs no `**` on gs://)."""
    if not folder.is_dir():
        return []
    return [f for child in folder.iterdir() for f in ([child] if child.is_file() else _files(child))]


def _storage(args: list[str]) -> int:
    from etils import epath

    source, destination = (epath.Path(p) for p in args[1:] if not p.startswith("-"))
    if args[0] == "cp":
        pairs = [(source, destination)]
    else:  # rsync -r
        pairs = [(f, destination / f.relative_to(source)) for f in _files(source)]
    if not pairs and not source.exists():
        print(f"ERROR: (gcloud.storage) {source} not found", file=sys.stderr)
        return 1
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return 0


def _dispatch(state_dir: pathlib.Path, args: list[str]) -> int:
    if args[0] == "storage":
        return _storage(args[1:])
    kind, verb, rest = args[2], args[3], args[4:]
    queued = kind == "queued-resources"
    name = _positional(rest)[0] if verb != "scp" else None
    if verb == "create":
        return _create(state_dir, name, rest, queued)
    if verb == "delete":
        return _delete(state_dir, name)
    if verb == "describe":
        return _describe(state_dir, name, queued)
    if verb == "ssh":
        return _ssh(state_dir, name, rest)
    if verb == "scp":
        return _scp(state_dir, rest)
    print(f"ERROR: the stand-in gcloud has no {' '.join(args[:4])}", file=sys.stderr)
    return 2


def main(args: list[str]) -> int:
    state_dir = _state_dir()
    command_line = " ".join(args)
    code = _injected_fault(state_dir, command_line)
    if code is not None:
        print(f"ERROR: (gcloud) injected failure, exit {code}", file=sys.stderr)
    else:
        code = _dispatch(state_dir, args)
    with _locked(state_dir), open(state_dir / "calls.jsonl", "a") as log:
        log.write(json.dumps({"argv": args, "code": code}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
