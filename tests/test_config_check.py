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
    ("reuse_states_from=['a{b}']", "reuse_states_from[0]: 'a{b}' does not match"),
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


def test_reuse_states_from_reaches_every_train_command_quoted(tmp_path):
    """Each text-to-image train job looks for states to reuse in its own results folder and in every folder of
    reuse_states_from, passed as one literal argument each (never run as shell code)."""
    other = "other results/$(touch PWNED)"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(REPO / "config" / "ci.yaml"), "--cores", "1", "-n", "-p",
           "--config", "n_tasks=[2, 3]", f"reuse_states_from=['{other}']"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    trains = [ln for ln in (res.stdout + res.stderr).splitlines() if " train --backbone " in ln]
    assert len(trains) == 2 and {"--n-tasks 2", "--n-tasks 3"} <= {m for ln in trains for m in
                                                                   ("--n-tasks 2", "--n-tasks 3") if m in ln}
    for ln in trains:
        assert "--reuse-states-from results/ci --reuse-states-from 'other results/$(touch PWNED)' " in ln, ln
