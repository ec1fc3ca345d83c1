"""Writes constraints.txt: the installed version of every package adapter-jax needs, directly or not.

Run from the repository root in the environment CI tested (after `pip install -c constraints.txt -e ".[test]"`
plus whatever new dependency setup.py gained):

    python -m scripts.freeze_constraints

CI (.ci/run) and the TPU launcher install with `-c constraints.txt`, so what runs on a TPU VM is what the tests
ran with. Requirements of the given extras that are not installed here (the `tpu` extra's jax[tpu] and gcsfs, on
a CPU machine) are left unpinned and named on stderr.
"""

import argparse
import importlib.metadata
import pathlib
import sys
from collections.abc import Iterable, Sequence

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = "adapter-jax"
EXTRAS = ("test", "tfds", "report", "tpu")
HEADER = """\
# Versions the tests ran with, for `pip install -c constraints.txt ...` (CI and the TPU launcher).
# Written by `python -m scripts.freeze_constraints` from the CI environment; edit setup.py, not this file.
"""


def _requirements(dist: importlib.metadata.Distribution, extras: Iterable[str]) -> list[Requirement]:
    """The distribution's requirements that apply here with the given extras (markers evaluated)."""
    wanted = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
            wanted.append(requirement)
    return wanted


def pins(project: str = PROJECT, extras: Sequence[str] = EXTRAS) -> tuple[dict[str, str], list[str]]:
    """({package: installed version} over the dependency closure of `project[extras]`, [requirements not installed]).

    Versions lose their local label (torch's "+cpu"): `==2.13.0` matches the CPU build and the default one.
    """
    found, missing, seen = {}, [], set()
    pending = _requirements(importlib.metadata.distribution(project), extras)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        # A package reached again with other extras (jax, then jax[tpu]) follows those extras' requirements too.
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        found[name] = dist.version.split("+")[0]
        pending += _requirements(dist, requirement.extras)
    found.pop(canonicalize_name(project), None)
    return found, sorted(set(missing))


def render(found: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(found.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "constraints.txt")
    flags = parser.parse_args(sys.argv[1:] if argv is None else argv)
    found, missing = pins()
    flags.out.write_text(render(found))
    print(f"wrote {len(found)} pins to {flags.out}")
    if missing:
        print(f"not installed here, left unpinned: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
