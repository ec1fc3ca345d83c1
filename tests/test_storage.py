"""What a run keeps on disk besides its workdir's files, and how it meets storage that fails: the compilation
cache (config.compilation_cache_dir), the storage deadline, a checkpoint save that fails in the background."""

import os
import subprocess
import sys
import time

import pytest

from tests.test_cli_robustness import RUN, _command, _console, _env, _run

COMPILE_ONE = """
import sys, jax, jax.numpy as jnp
from adapter_jax import compilation_cache
compilation_cache.use(sys.argv[1])
jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
"""


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in _env().items() if key != "JAX_COMPILATION_CACHE_DIR"}
    return subprocess.run([sys.executable, "-c", code, *args], env={**environment, **env}, capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_compilation_cache_goes_where_the_config_says_and_empty_turns_it_off(tmp_path):
    used = _python(COMPILE_ONE, str(tmp_path / "cache"))
    assert used.returncode == 0, used.stderr
    assert any((tmp_path / "cache").iterdir())
    # "" turns off even the folder JAX's own variable names.
    off = _python(COMPILE_ONE, "", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "environment"))
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / "environment").exists() or not any((tmp_path / "environment").iterdir())


def test_storage_that_does_not_answer_within_the_deadline_ends_the_process_with_one_error_line():
    hang = ("import time\nfrom adapter_jax import checkpoint\n"
            "with checkpoint.storage_deadline(0.02, 'saving a checkpoint to gs://b/run/checkpoints'):\n"
            "    time.sleep(60)")
    started = time.time()
    ended = _python(hang)
    assert ended.returncode == 1
    assert time.time() - started < 30
    assert ended.stderr.strip() == (
        "error: saving a checkpoint to gs://b/run/checkpoints did not finish within 0.02 minutes "
        "(config.storage_deadline_minutes): the storage stopped answering. Stopping; rerun to resume from the last "
        "complete checkpoint.")


@pytest.mark.slow  # the entry point in a subprocess
def test_a_checkpoint_that_fails_in_the_background_stops_the_run_before_the_export(
    tiny_model_dir, tiny_glue_dir, tmp_path
):
    """Full fine-tuning: checkpoints and the export hold the 1M-parameter embeddings, more than the disk takes;
    steps at full speed, so the failed save of step 2 is still in the background when step 4's export comes."""
    run = {**RUN, "checkpoint_every_steps": 2}
    command = _command("adapter_jax.main", tmp_path, tiny_model_dir, tiny_glue_dir, "--config.mode=full", run=run)
    result = _run(command, FSIZE_LIMIT=1_000_000)
    assert result.returncode == 1, result.stderr
    assert _console(result.stderr) == [f"error: cannot write a checkpoint to {tmp_path / 'checkpoints'}: File too large"]
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())
    assert os.listdir(tmp_path / "checkpoints") == []
