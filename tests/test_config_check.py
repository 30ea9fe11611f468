"""A bad configuration stops `snakemake -n` in seconds, before any job, with one line naming the key, the value
and what is allowed (the Snakefile runs the schema and continual_bench.config_check)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override, expected", [
    ("method_settings={lora_sequential: {lr: 0}}",
     "method_settings.lora_sequential.lr: 0.0 is out of range; allowed: lr > 0"),
    ("method_settings={lora_seqential: {steps: 3}}", "method_settings.lora_seqential: unknown method 'lora_seqential'"),
    ("n_tasks=[4]", "n_tasks: 4 is out of range for toy_faces, which has 3 concepts (toy.n_concepts); allowed: 1..3"),
    ("seeds=[-1]", "seeds[0]: -1 is less than the minimum of 0"),
    ("run_name=..", "run_name: '..' does not match"),
])
def test_bad_config_stops_the_dry_run_with_one_line(tmp_path, override, expected):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(REPO / "config" / "ci.yaml"), "--cores", "1", "-n", "--config", override]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("continual-bench: configuration error: ")]
    assert len(lines) == 1 and expected in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Building DAG" not in res.stdout + res.stderr
    assert not (tmp_path / "results").exists() and time.time() - t0 < 60


def test_reuse_states_from_refuses_braces():
    """Its paths are placed in a shell template, where braces would be read as placeholders (the train command is
    checked in tests/test_dag.py: test_default_config_plans_5_10_20_task_sequences)."""
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    cfg = {**yaml.safe_load((REPO / "config" / "ci.yaml").read_text()), "reuse_states_from": ["a{b}"]}
    with pytest.raises(WorkflowError, match="'a{b}' does not match"):
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    validate({**cfg, "reuse_states_from": ["other results/$(x)"]}, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
