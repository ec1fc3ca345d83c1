"""constraints.txt (what CI and the TPU launcher install with) pins the versions this environment tests with."""

import pathlib

from scripts import freeze_constraints

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_committed_constraints_are_the_tested_environment():
    found, _ = freeze_constraints.pins()
    # Direct dependencies and ones reached only through others (jax -> ml-dtypes), all pinned.
    assert {"jax", "flax", "orbax-checkpoint", "ml-dtypes", "torch"} <= set(found)
    assert "adapter-jax" not in found and not any("+" in version for version in found.values())
    # Every installed package is pinned at its installed version. Pins of extras not installed here (gcsfs's
    # closure, from the tpu extra, in CI's test-only environment) cannot be checked in this environment.
    committed = dict(
        line.split("==") for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    wrong = {name: (committed.get(name), version) for name, version in found.items() if committed.get(name) != version}
    assert not wrong, (
        f"constraints.txt differs from this environment (pinned, installed): {wrong}; "
        "rerun python -m scripts.freeze_constraints")
