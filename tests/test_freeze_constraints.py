"""constraints.txt (what CI and the TPU launcher install with) pins the versions this environment tests with."""

import pathlib

from scripts import freeze_constraints

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_committed_constraints_are_the_tested_environment():
    found, _ = freeze_constraints.pins()
    # Direct dependencies and ones reached only through others (jax -> ml-dtypes), all pinned.
    assert {"jax", "flax", "orbax-checkpoint", "ml-dtypes", "torch"} <= set(found)
    assert "adapter-jax" not in found and not any("+" in version for version in found.values())
    committed = (REPO_ROOT / "constraints.txt").read_text()
    assert committed == freeze_constraints.render(found), (
        "constraints.txt differs from this environment; rerun python -m scripts.freeze_constraints")
