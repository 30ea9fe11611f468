"""An external package adds a method through the entry point group, installed by pip, offline.

The fixture ``tests/fixtures/cb_plugin_example`` is a complete installable package (pyproject.toml with
``[project.entry-points."continual_bench.methods"]``). It is pip-installed into a temporary target folder
(the repository's venv stays untouched), then the CLI lists it and the engine trains it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from continual_bench.engine.t2i import RunSpec, train_sequence
from continual_bench.methods import registry

FIXTURE = Path(__file__).parent / "fixtures" / "cb_plugin_example"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(FIXTURE, tmp / "src")  # pip builds in place: keep build/ and egg-info out of the repo
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), str(src)],
                   check=True, capture_output=True, text=True)
    return site


def test_installed_plugin_is_listed_by_the_cli(plugin_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run([sys.executable, "-m", "continual_bench", "methods", "--json"], capture_output=True, text=True,
                         check=True, env=env).stdout
    row = next(r for r in json.loads(out) if r["name"] == "example_lora_l2")
    assert row["track"] == "t2i" and row["module"] == "cb_plugin_example.lora_l2" and "Kirkpatrick" in row["paper"]


def test_installed_plugin_trains_on_the_tiny_world(plugin_site, tiny_pipeline, tiny_world, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the plugin leaves the registry afterwards
    monkeypatch.setattr(registry, "_LOADED", False)
    spec = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="example_lora_l2", n_tasks=1, seed=0,
                   settings={"steps": 2, "batch_size": 2, "rank": 2, "l2_weight": 1.0})
    (meta,) = train_sequence(spec, tmp_path / "ck")
    assert meta["steps"] == 2 and meta["N_train"] > 0 and meta["loss_last"] > 0


def test_docs_walkthrough_method_runs(tiny_pipeline, tiny_world, tmp_path, monkeypatch):
    """The complete method of docs/adding-a-method.md registers and trains as printed."""
    import re
    import types

    doc = (Path(__file__).parent.parent / "docs" / "adding-a-method.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if '@register("t2i", "lora_l2")' in b)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry._load_all()
    mod = types.ModuleType("docs_lora_l2")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)  # dataclasses look their module up
    exec(compile(code, "docs/adding-a-method.md", "exec"), mod.__dict__)
    assert registry.get_method("t2i", "lora_l2") is mod.LoRAL2
    spec = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_l2", n_tasks=1, seed=0,
                   settings={"steps": 2, "batch_size": 2, "rank": 2, "l2_weight": 0.5})
    (meta,) = train_sequence(spec, tmp_path / "ck")
    assert meta["steps"] == 2 and meta["loss_last"] > 0
