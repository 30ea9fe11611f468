"""environment.yml and the rules' conda env are generated from requirements.lock (tools/sync_envs.py): in sync."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_conda_envs_are_generated_from_the_lock():
    spec = importlib.util.spec_from_file_location("sync_envs", ROOT / "tools" / "sync_envs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "environment.yml").read_text() == mod.render("continual-bench", ["-e ."]), "run: make envs"
    assert (ROOT / "workflow/envs/continual-bench.yaml").read_text() == mod.render("continual-bench-rules", []), \
        "run: make envs"
