"""gcloud's ssh key in an ssh-agent, for pods.

With more than one worker, `gcloud compute tpus tpu-vm ssh/scp --worker=all` requires the user's key in an
ssh-agent (gcloud's `VerifyKeyInAgent`): it fails with "Please run ssh-add" when an agent lacks the key, and with
no agent at all warns "Command may stall" and may wait for a passphrase per worker. The launcher does not ask the
user to know this: when no agent holds the key, it starts a private one for its own gcloud calls, adds the key,
and stops the agent at the end; a key that cannot be added (a passphrase and no terminal) is one clear error,
before anything is created.
"""

import contextlib
import os
import pathlib
import re
import signal
import subprocess
from collections.abc import Iterator

from scripts.tpu.gcloud import StepError

GCLOUD_KEY = "~/.ssh/google_compute_engine"  # where gcloud keeps the key it puts on every TPU VM
_AGENT_VARIABLES = re.compile(r"(SSH_AUTH_SOCK|SSH_AGENT_PID)=([^;\n]+);")


def _fingerprint(key: pathlib.Path) -> str:
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        raise StepError(f"cannot read gcloud's ssh key {key}: {listed.stderr.strip()}")
    return listed.stdout.split()[1]


def _agent_holds(key: pathlib.Path) -> bool:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return False
    listed = subprocess.run(["ssh-add", "-l"], capture_output=True, text=True, check=False)
    return listed.returncode == 0 and _fingerprint(key) in listed.stdout


def _make_key(key: pathlib.Path) -> None:
    """The key gcloud would make on its first ssh (RSA, no passphrase), made here so no prompt interrupts a pod."""
    print(f"# making gcloud's ssh key {key} (no passphrase), as gcloud's first ssh would", flush=True)
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-t", "rsa", "-N", "", "-q", "-f", str(key)], check=True,
                   stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def gcloud_key_in_agent() -> Iterator[None]:
    """Within it, SSH_AUTH_SOCK names an agent that holds gcloud's key (the user's own when it does already)."""
    key = pathlib.Path(GCLOUD_KEY).expanduser()
    if not key.exists():
        _make_key(key)
    if _agent_holds(key):
        yield
        return
    started = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True)
    agent = dict(_AGENT_VARIABLES.findall(started.stdout))
    saved = {name: os.environ.get(name) for name in agent}
    os.environ.update(agent)
    try:
        # No terminal to ask for a passphrase on: ssh-add fails at once instead of waiting.
        added = subprocess.run(["ssh-add", str(key)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               check=False)
        if added.returncode != 0:
            raise StepError(f"a pod's gcloud ssh needs its key in an ssh-agent, and {key} could not be added "
                            f"({added.stderr.strip()}); run `eval $(ssh-agent) && ssh-add {key}`, then rerun")
        print(f"# {key} is in a private ssh-agent for this launcher's gcloud calls (a pod's ssh needs one)",
              flush=True)
        yield
    finally:
        os.kill(int(agent["SSH_AGENT_PID"]), signal.SIGTERM)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
