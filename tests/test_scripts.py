"""Every script runs as `python -m scripts.NAME` from the repository root, with no sys.path changes of its own."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a subprocess per script, each importing JAX
# Every module under scripts/ (found, so that a new script is covered without being listed), and the server.
# Library modules (scripts.markdown, scripts.tpu.gcloud, ...) have no main guard: they must import cleanly,
# and only entry points are asked for their help text.
SCRIPTS = sorted(
    ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    for path in (REPO_ROOT / "scripts").rglob("*.py")
    if path.stem != "__init__"
) + ["adapter_jax.serve"]


@pytest.mark.parametrize("module", SCRIPTS)
def test_script_runs_as_a_module_from_the_repository_root(module):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    source = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text()
    if 'if __name__ == "__main__":' in source:
        # Both absl and argparse print the module docstring as the help text.
        assert ast.get_docstring(ast.parse(source)).splitlines()[0] in result.stdout
