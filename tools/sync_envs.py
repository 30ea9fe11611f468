"""Write environment.yml and workflow/envs/continual-bench.yaml from requirements.lock (the one source of pins).

* ``environment.yml`` is the driver's environment: every pin of the lock (Snakemake, its plugins, pytest: the
  workflow and test tools) and the package itself (``-e .``).
* ``workflow/envs/continual-bench.yaml`` is the environment of the rules' jobs (``--use-conda``): only what the jobs
  import, i.e. the package's runtime dependencies (pyproject.toml ``[project] dependencies``) and everything they
  depend on, without the driver's tools (``DRIVER_ONLY``: Snakemake is a dependency of the package so that one
  ``pip install -e .`` sets up the driver, but no job imports it) and what only those need.

The dependency graph is read from the installed distributions' metadata (``Requires-Dist``, markers evaluated for
this machine, extras followed), so run this with the project's venv: ``make envs``. conda cannot install the CUDA
wheels' exact builds from conda-forge, so both files let conda provide Python and pip, and pip install the locked
versions. tests/test_environment.py checks that both files are what this script writes.
"""
from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# Generated from requirements.lock by tools/sync_envs.py (make envs); do not edit by hand.\n"
DRIVER_ONLY = frozenset({"snakemake"})  # runtime dependencies of the package that no job imports
UNPINNED = frozenset({"pip", "setuptools", "wheel"})  # `pip freeze` (make lock) omits them; pip installs them as needed


def pins() -> list[str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def pin_name(pin: str) -> str:
    return canonicalize_name(pin.split("==")[0])


def _requires(name: str, extras: frozenset[str], needed_by: str) -> list[Requirement]:
    """The requirements of installed distribution ``name`` that apply here with ``extras`` requested."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"sync_envs: {name} (required by {needed_by}) is not installed; run this with the project's venv "
                 "(make envs)")
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def runtime_closure() -> set[str]:
    """Canonical names of the package's runtime dependencies but DRIVER_ONLY, and of all they depend on."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [(Requirement(r), project["name"]) for r in project["dependencies"]]
    todo = [(r, by) for r, by in todo if canonicalize_name(r.name) not in DRIVER_ONLY]
    seen: dict[str, frozenset[str]] = {}
    while todo:
        req, by = todo.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, frozenset()) | extras
        todo += [(r, name) for r in _requires(name, seen[name], by)]
    return set(seen)


def rules_pins() -> list[str]:
    """The lock's pins of :func:`runtime_closure`; a dependency the lock does not pin is an error."""
    closure = runtime_closure()
    pinned = {pin_name(p) for p in pins()}
    missing = sorted(closure - pinned - UNPINNED)
    if missing:
        sys.exit(f"sync_envs: requirements.lock pins no version of {', '.join(missing)} (make lock)")
    return [p for p in pins() if pin_name(p) in closure]


def render(name: str, pip: list[str]) -> str:
    out = [HEADER, f"name: {name}\n", "channels:\n  - conda-forge\n", "dependencies:\n",
           "  - python=3.11\n", "  - pip\n", "  - pip:\n"]
    out += [f"      - {p}\n" for p in pip]
    return "".join(out)


def driver_env() -> str:
    return render("continual-bench", pins() + ["-e ."])


def rules_env() -> str:
    return render("continual-bench-rules", rules_pins())


def main() -> None:
    (ROOT / "environment.yml").write_text(driver_env())
    (ROOT / "workflow/envs/continual-bench.yaml").write_text(rules_env())


if __name__ == "__main__":
    main()
