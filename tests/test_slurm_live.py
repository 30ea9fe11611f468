"""The cluster path for real: the tiny CI DAG (config/ci.yaml) through ``--profile profiles/slurm`` on a live SLURM.

Marked ``slurm``: pyproject's addopts deselect the marker, so ``make test`` never runs it; ``make test-slurm`` (and
``.ci/run``, after ``make test``) runs ``pytest -m slurm``. It needs a running cluster whose default partition is
``local`` (``tools/slurm-local.sh start``, as root: a one-node SLURM on this machine); without one it is skipped,
unless ``CONTINUAL_BENCH_SLURM=1`` asks for it (``make test-slurm``, ``.ci/run``), where a missing cluster fails it.

One module fixture does the runs, in temporary working directories:
- the local reference: ``snakemake --cores 2`` (started first, runs beside the cluster run, which mostly waits);
- the cluster run (the command the README shows), with the first attempt of ``train`` failing on purpose: a
  test-only ``sitecustomize`` (``tests/fixtures/fail_once/``) on this run's ``PYTHONPATH`` makes it exit before any
  work, so the profile's ``retries: 1`` must resubmit it;
- the same command again, which must submit nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "slurm-local.sh"
FAIL_ONCE = REPO / "tests" / "fixtures" / "fail_once"
FAILING_RULE = "train"  # its CLI subcommand has the same name
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def _cluster_status_command() -> str:
    """--slurm-status-command for the running cluster (sacct with accounting, else squeue); skip or fail without one."""
    why = None
    if not shutil.which("sbatch"):
        why = "no SLURM client (sbatch) on this machine"
    else:
        res = subprocess.run(["bash", str(TOOL), "status-command"], capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or res.stdout.strip() not in ("sacct", "squeue"):
            why = f"no SLURM cluster answers ({(res.stderr or res.stdout).strip()})"
    if why:
        why += "; start one with `sudo tools/slurm-local.sh start`"
        if os.environ.get("CONTINUAL_BENCH_SLURM") == "1":
            pytest.fail(f"CONTINUAL_BENCH_SLURM=1 asks for the live SLURM test, but {why}", pytrace=False)
        pytest.skip(why)
    return res.stdout.strip()


def _snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    """`snakemake --directory <workdir> --configfile config/ci.yaml ...`, run in the repository (cwd=REPO)."""
    return [sys.executable, "-m", "snakemake", "--directory", str(workdir), "--configfile", "config/ci.yaml", *args]


def cluster_args(status_command: str) -> list[str]:
    """What a user types on the test cluster (README "SLURM"), past `snakemake --directory ... --configfile ...`."""
    return ["--profile", "profiles/slurm", "--workflow-profile", "profiles/slurm-local",
            "--slurm-status-command", status_command]


def _env(**extra) -> dict:
    return dict(os.environ, CONTINUAL_BENCH_NO_TQDM="1", **extra)


def _slurm_jobs() -> dict[str, str]:
    """Every job the controller still lists (MinJobAge keeps finished ones for a day): id -> state."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return dict(line.split("|", 1) for line in out.split())


def _failed(res: subprocess.CompletedProcess, what: str, workdir: Path) -> str:
    logs = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(workdir.rglob("*.log"))[:40])
    return f"{what} failed ({res.returncode}):\n{res.stderr[-8000:]}\n{logs}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    status_command = _cluster_status_command()
    base = tmp_path_factory.mktemp("slurm_live")
    local, cluster = base / "local", base / "cluster"
    local.mkdir()
    cluster.mkdir()
    plan = subprocess.run(_snakemake_cmd(cluster, "-n", "--cores", "1", "--quiet", "rules"), capture_output=True,
                          text=True, timeout=300, env=_env(), cwd=REPO)
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", plan.stdout + plan.stderr, re.M)
               if m.group(1) != "total"}

    # the local reference runs beside the cluster run (which spends most of its time waiting for status polls)
    local_log = open(base / "local.stderr", "w")
    local_proc = subprocess.Popen(_snakemake_cmd(local, "--cores", "2"), stdout=subprocess.DEVNULL, stderr=local_log,
                                  env=_env(), cwd=REPO)
    try:
        marker = base / f"{FAILING_RULE}.failed-once"
        pythonpath = os.pathsep.join(p for p in (str(FAIL_ONCE), os.environ.get("PYTHONPATH")) if p)
        inject = _env(PYTHONPATH=pythonpath, CONTINUAL_BENCH_TEST_FAIL_ONCE=f"{FAILING_RULE}:{marker}")
        cmd = _snakemake_cmd(cluster, *cluster_args(status_command))
        jobs_before = _slurm_jobs()
        t0 = time.monotonic()
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=inject, cwd=REPO)
        wall = time.monotonic() - t0
        assert first.returncode == 0, _failed(first, "the SLURM run", cluster)
        jobs_after = _slurm_jobs()
        t1 = time.monotonic()
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=inject, cwd=REPO)
        rerun_wall = time.monotonic() - t1
        jobs_after_rerun = _slurm_jobs()
        assert local_proc.wait(timeout=1200) == 0, (base / "local.stderr").read_text()[-6000:]
    finally:
        if local_proc.poll() is None:
            local_proc.kill()
        local_log.close()
    submitted = [(int(a), b, Path(c)) for a, b, c in SUBMITTED.findall(first.stdout + first.stderr)]
    new_jobs = {j: s for j, s in jobs_after.items() if j not in jobs_before}
    summary = {"status_command": status_command, "wall_s": round(wall, 1), "rerun_wall_s": round(rerun_wall, 1),
               "sbatch_submissions": len(submitted),
               "slurm_jobs": dict(sorted(new_jobs.items(), key=lambda kv: int(kv[0])))}
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"summary": summary, "base": base, "local": local, "cluster": cluster, "first": first, "rerun": rerun,
            "planned": planned, "submitted": submitted, "new_jobs": new_jobs, "jobs_after": jobs_after,
            "jobs_after_rerun": jobs_after_rerun, "marker": marker}


def _job_rules(output: str) -> dict[int, str]:
    """Snakemake job id -> rule, from the run's log ('rule train:' ... 'jobid: 5')."""
    rules = {}
    for block in re.split(r"\n(?=\[[^\]]*\]\n|(?:local)?rule \w+:)", output):
        m = re.search(r"^(local)?rule (\w+):", block, re.M)
        j = re.search(r"^\s+jobid: (\d+)$", block, re.M)
        if m and j:
            rules[int(j.group(1))] = ("local " if m.group(1) else "") + m.group(2)
    return rules


def test_every_job_went_through_sbatch(runs, capsys):
    s = runs["summary"]
    with capsys.disabled():  # the measurement, also under -q
        print(f"\nlive SLURM run: {s['wall_s']} s, {s['sbatch_submissions']} sbatch submissions ({s['status_command']} "
              f"status); rerun {s['rerun_wall_s']} s; details in {runs['base']}/summary.json")
    out = runs["first"].stdout + runs["first"].stderr
    rules = _job_rules(out)
    submitted = runs["submitted"]
    by_rule = Counter(rules[j] for j, _, _ in submitted)
    expected = {r: n for r, n in runs["planned"].items() if r != "all"}
    expected[FAILING_RULE] += 1  # its first attempt failed; the retry is a second submission
    assert dict(by_rule) == expected, out[-4000:]
    assert not [r for r in rules.values() if r.startswith("local ") and r != "local all"], out[-4000:]
    # SLURM knows exactly these jobs as new ones, and ran them: the log of each is where the plugin says
    slurm_ids = [s for _, s, _ in submitted]
    assert len(set(slurm_ids)) == len(slurm_ids)
    assert set(runs["new_jobs"]) == set(slurm_ids)
    assert Counter(runs["new_jobs"].values()) == Counter({"COMPLETED": len(slurm_ids) - 1, "FAILED": 1})
    for snakemake_id, slurm_id, log in submitted:
        assert log.name == f"{slurm_id}.log" and log.is_file(), log
        assert log.is_relative_to(runs["cluster"] / ".snakemake" / "slurm_logs" / f"rule_{rules[snakemake_id]}")
    # every rule wrote its own log where the workflow says (next to its outputs)
    assert (runs["cluster"] / "results/ci/runs/toy_faces/T2/lora_sequential/seed0/logs/train.log").is_file()


def _metric_files(root: Path) -> dict[str, Path]:
    res = root / "results" / "ci"
    files = [*res.glob("runs/**/metrics.csv"), *res.glob("runs/**/R.csv"), *res.glob("noise_floor/*.csv"),
             res / "summary.csv"]
    return {str(p.relative_to(res)): p for p in files}


PROVENANCE = {"config_hash", "git_commit", "continual_bench", "python", "packages", "seconds"}


def test_metric_files_equal_a_local_run(runs):
    local, cluster = _metric_files(runs["local"]), _metric_files(runs["cluster"])
    assert set(local) == set(cluster) and len(local) >= 4, (sorted(local), sorted(cluster))
    for name in sorted(local):
        a, b = pd.read_csv(local[name]), pd.read_csv(cluster[name])
        cols = [c for c in a.columns if c not in PROVENANCE]
        assert list(a.columns) == list(b.columns), name
        pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True, obj=name)  # to the last digit


def test_injected_failure_succeeds_on_the_retry(runs):
    out = runs["first"].stdout + runs["first"].stderr
    rules = _job_rules(out)
    attempts = [(s, log) for j, s, log in runs["submitted"] if rules[j] == FAILING_RULE]
    assert len(attempts) == 2, attempts
    (first_id, first_log), (retry_id, _) = sorted(attempts, key=lambda a: int(a[0]))
    assert runs["marker"].read_text().strip() == first_id  # the failure happened inside the first SLURM job
    assert runs["new_jobs"][first_id] == "FAILED" and runs["new_jobs"][retry_id] == "COMPLETED"
    run_dir = runs["cluster"] / "results/ci/runs/toy_faces/T2/lora_sequential/seed0"
    assert "injected failure" in (run_dir / "logs" / "train.log").read_text()  # appended: the retry keeps it
    # the failed job's SLURM log names the rule and shows the tail of the rule's log (train's shell prints it on
    # failure: the log is not a declared output, so --show-failed-logs has nothing to print)
    first_text = first_log.read_text()
    assert "Error in rule train" in first_text and "injected failure" in first_text, first_text[-3000:]
    assert (runs["cluster"] / "results/ci/runs/toy_faces/T2/lora_sequential/seed0/train.json").is_file()


def test_rerun_submits_nothing(runs):
    rerun = runs["rerun"]
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "Nothing to be done" in out
    assert not SUBMITTED.search(out)
    assert set(runs["jobs_after_rerun"]) == set(runs["jobs_after"])  # not one new SLURM job
