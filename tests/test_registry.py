import json
import subprocess
import sys
import textwrap

import pytest

from continual_bench.methods import registry
from continual_bench.methods.base import TrainSettings, build_settings
from continual_bench.utils import UserError


def test_methods_json_cli():
    out = subprocess.run([sys.executable, "-m", "continual_bench", "methods", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out)
    assert {"track": "t2i", "name": "lora_sequential"}.items() <= next(r for r in rows if r["name"] == "lora_sequential").items()
    assert all({"track", "name", "paper"} <= set(r) and r["track"] in ("t2i", "cls") and r["paper"] for r in rows)


def test_unknown_method_names_it():
    with pytest.raises(UserError, match="unknown method 'nope' for track 't2i'.*lora_sequential"):
        registry.get_method("t2i", "nope")


def test_settings_reject_unknown_and_bad_types():
    with pytest.raises(UserError, match=r"method_settings.x: unknown setting\(s\) \['stepz'\]"):
        build_settings(TrainSettings, {"stepz": 3}, "method_settings.x")
    with pytest.raises(UserError, match="method_settings.x.steps: expected int"):
        build_settings(TrainSettings, {"steps": "many"}, "method_settings.x")
    assert build_settings(TrainSettings, {"lr": 1}, "m").lr == 1.0


def test_docstring_required():
    with pytest.raises(ValueError, match="docstring"):
        @registry.register("t2i", "undocumented")
        class Undocumented:
            pass


def test_entry_point_plugin(tmp_path, monkeypatch):
    """An external package registers through the entry point group, without editing the engine."""
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        from continual_bench.methods import register
        from continual_bench.methods.t2i.lora_sequential import LoRASequential

        @register("t2i", "my_plugin_method")
        class Mine(LoRASequential):
            """A plugin (Doe et al. 2030, eq. 1)."""
            paper = "Doe et al. 2030"
    '''))
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[continual_bench.methods]\nmine = my_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LOADED", False)
    # the plugin's registration is undone after the test: later tests in this process (the ledger's check of every
    # registered method, tests/test_deviations.py) must not see a method that exists only here
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)
    names = {(m["track"], m["name"]) for m in registry.list_methods()}
    assert ("t2i", "my_plugin_method") in names
    assert registry.get_method("t2i", "my_plugin_method").paper == "Doe et al. 2030"
