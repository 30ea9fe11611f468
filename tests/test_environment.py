"""environment.yml (the driver's env) and the rules' conda env are generated from requirements.lock (tools/sync_envs.py):
in sync; the rules' env holds what the jobs import and not the workflow's or the tests' tools."""
import ast
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
RULES_ENV = ROOT / "workflow" / "envs" / "continual-bench.yaml"


@pytest.fixture(scope="module")
def sync_envs():
    spec = importlib.util.spec_from_file_location("sync_envs", ROOT / "tools" / "sync_envs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pinned(path: Path) -> set[str]:
    return {canonicalize_name(line.split("- ", 1)[1].split("==")[0]) for line in path.read_text().splitlines()
            if "==" in line}


def test_conda_envs_are_generated_from_the_lock(sync_envs):
    assert (ROOT / "environment.yml").read_text() == sync_envs.driver_env(), "run: make envs"
    assert RULES_ENV.read_text() == sync_envs.rules_env(), "run: make envs"


def test_rules_env_holds_no_workflow_or_test_tools(sync_envs):
    rules, driver = _pinned(RULES_ENV), _pinned(ROOT / "environment.yml")
    assert driver == {sync_envs.pin_name(p) for p in sync_envs.pins()}  # the driver's env: the whole lock
    assert {"snakemake", "snakemake-executor-plugin-slurm", "pytest", "pytest-xdist"} <= driver
    assert "      - -e .\n" in (ROOT / "environment.yml").read_text()
    tools = sorted(n for n in rules if n.startswith(("snakemake", "pytest")) or n in {"execnet", "iniconfig", "pluggy"})
    assert not tools, f"the rules' env pins driver tools: {tools}"
    # what only Snakemake needs goes with it (its config, storage and report dependencies)
    assert not rules & {"configargparse", "gitpython", "pulp", "yte", "dpath", "conda-inject", "sqlmodel"}
    assert len(rules) < len(driver)


def _imported_distributions() -> set[str]:
    """Distributions of every module the package imports (at module level or inside functions), stdlib excluded."""
    modules = set()
    for path in (ROOT / "continual_bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"continual_bench"}
    owners = metadata.packages_distributions()
    unknown = sorted(m for m in modules if m not in owners)
    assert not unknown, f"imported but installed by no distribution: {unknown}"
    return {canonicalize_name(d) for m in modules for d in owners[m]}


def test_rules_env_holds_everything_the_jobs_import(sync_envs):
    """Every distribution the package imports, and every runtime dependency of those, is pinned in the rules' env."""
    rules = _pinned(RULES_ENV)
    imported = _imported_distributions()
    assert {"torch", "diffusers", "peft", "pandas", "pyyaml", "requests"} <= imported
    assert imported <= rules, sorted(imported - rules)
    assert sync_envs.runtime_closure() - sync_envs.UNPINNED <= rules
    assert {"transformers", "huggingface-hub", "tokenizers", "jinja2", "torch-fidelity"} <= rules  # declared or transitive
