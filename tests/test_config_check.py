"""A bad configuration stops `snakemake -n` in seconds, before any job, with one line naming the key, the value
and what is allowed (the Snakefile runs the schema and continual_bench.config_check)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config, validate  # what the Snakefile passes: it fills in the defaults

REPO = Path(__file__).resolve().parent.parent


CASES = [
    ("method_settings={lora_sequential: {lr: 0}}",
     "method_settings.lora_sequential.lr: 0.0 is out of range; allowed: lr > 0"),
    ("method_settings={lora_seqential: {steps: 3}}", "method_settings.lora_seqential: unknown method 'lora_seqential'"),
    ("n_tasks=[4]", "n_tasks: 4 is out of range for toy_faces, which has 3 concepts (toy.n_concepts); allowed: 1..3"),
    ("seeds=[-1]", "seeds[0]: -1 is less than the minimum of 0"),
    ("run_name=..", "run_name: '..' does not match"),
    ("n_taks=[3]", "config: Additional properties are not allowed ('n_taks' was unexpected)"),
]


SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def _ci_config(override: str | None = None) -> dict:
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    if override:
        key, value = override.split("=", 1)
        update_config(config, {key: yaml.safe_load(value)})
    return config


@pytest.mark.parametrize("override, expected", CASES)
def test_the_snakefiles_check_stops_every_case_with_one_line(override, expected):
    """What the Snakefile runs when it loads (config_check.check_workflow_config), in-process: the messages
    themselves are pinned in tests/test_integrity.py."""
    from continual_bench.config_check import check_workflow_config
    from continual_bench.utils import UserError

    with pytest.raises(UserError) as err:
        check_workflow_config(_ci_config(override), SCHEMA, REPO, validate=validate)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_snakefiles_check_reads_config_strings_and_fills_defaults():
    """`--config` gives strings inside lists and mappings: they become the integers and booleans the schema wants;
    the schema's defaults are filled in; a job's own Snakemake (plan=False) skips the registry check."""
    from continual_bench.config_check import check_workflow_config
    from continual_bench.utils import UserError

    config = {**_ci_config(), "seeds": ["0", "2"], "paper": {"offline": "True"}}
    assert "device" not in config
    check_workflow_config(config, SCHEMA, REPO, validate=validate)
    assert config["seeds"] == [0, 2] and config["paper"]["offline"] is True and config["device"] == "auto"
    unknown = _ci_config("methods=[lora_seq]")
    check_workflow_config(unknown, SCHEMA, REPO, validate=validate, plan=False)
    with pytest.raises(UserError, match="unknown method 'lora_seq'"):
        check_workflow_config(unknown, SCHEMA, REPO, validate=validate)


# Through Snakemake itself (each start costs seconds): one schema problem, one the registry and the world find; the
# strings arrive as `--config` gives them (integers inside lists as text).
@pytest.mark.parametrize("override, expected", [c for c in CASES if c[0].startswith(("n_tasks", "seeds"))])
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
    from snakemake.exceptions import WorkflowError

    cfg = {**yaml.safe_load((REPO / "config" / "ci.yaml").read_text()), "reuse_states_from": ["a{b}"]}
    with pytest.raises(WorkflowError, match="'a{b}' does not match"):
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    validate({**cfg, "reuse_states_from": ["other results/$(x)"]}, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
