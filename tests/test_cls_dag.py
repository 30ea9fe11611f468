"""The classification part of the DAG on a minimal config (config/ci_cls.yaml): data, toy ViT, runs, tables."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from continual_bench.utils import weights_fingerprint

REPO = Path(__file__).resolve().parent.parent
CI_CLS = REPO / "config" / "ci_cls.yaml"


def snakemake(workdir: Path, *args: str, config=CI_CLS, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), "--cores", "1", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CONTINUAL_BENCH_NO_TQDM="1"))
    if check and res.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in workdir.rglob("*.log"))
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stderr[-6000:]}\n{logs}")
    return res


@pytest.fixture(scope="module")
def cls_dag(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cls_dag")
    snakemake(work)
    return work


def test_cls_runs_and_summary(cls_dag):
    res = cls_dag / "results" / "ci_cls"
    summary = pd.read_csv(res / "summary.csv")
    assert set(summary.track) == {"cls"}
    got = {(r.method, r.metric) for r in summary.itertuples()}
    for m in ("coda_p", "ft_pp"):
        assert {(m, "A_N"), (m, "F_N"), (m, "F_avl"), (m, "P_N"), (m, "N_train"), (m, "N_store")} <= got
    assert ("upper_bound", "A_N") in got and ("upper_bound", "F_N") not in got
    a_n = summary[summary.metric == "A_N"]
    assert a_n["mean"].between(0, 100).all()
    run = res / "runs/toy_imagenet_r/T2/coda_p/seed0"
    acc = pd.read_csv(run / "acc_matrix.csv")
    assert sorted(zip(acc.after_task, acc.task)) == [(1, 1), (2, 1), (2, 2)]
    per_run = pd.read_csv(run / "metrics.csv")
    assert per_run.config_hash.notna().all() and "torch=" in per_run.packages.iloc[0]
    assert set(per_run.weights) == {f"backbone={weights_fingerprint(cls_dag / 'resources/toy/vit')}"}
    assert (res / "tables" / "toy_imagenet_r_T2.csv").is_file() and (res / "tables" / "toy_imagenet_r_combined.csv").is_file()
    assert (run / "R.csv").is_file() and list((res / "figures" / "summary").glob("accuracy_toy_imagenet_r*.png"))
    assert not list((run / "checkpoints").glob("*/task_001/state.safetensors"))  # only the last state is kept


def test_cls_second_run_has_nothing_to_do(cls_dag):
    res = snakemake(cls_dag, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr


def test_a_fresh_clone_recomputes_the_committed_runs(cls_dag, tmp_path):
    """What git commits of a run (metrics, matrices, train.json, tables) does not stop a fresh clone from training
    it again: predictions.npz (and the checkpoints, data and ViT) are not committed, so the DAG rebuilds them."""
    import numpy as np

    run = cls_dag / "results/ci_cls/runs/toy_imagenet_r/T2/coda_p/seed0"
    p = np.load(run / "predictions.npz")
    acc = pd.read_csv(run / "acc_matrix.csv")
    last = acc[acc.after_task == 2].sort_values("task")
    got = [100.0 * (p["pred"][1, p["task"] == t] == p["label"][p["task"] == t]).mean() for t in (1, 2)]
    np.testing.assert_allclose(got, last.acc.to_numpy())
    committed = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(REPO / "results/x/runs/b/T2/m/seed0/predictions.npz")],
                               cwd=REPO)
    assert committed.returncode == 0  # ignored, as samples.npz
    clone = tmp_path / "clone"  # the committed files with their mtimes (copy2), as a clone has them
    shutil.copytree(cls_dag / "results/ci_cls", clone / "results/ci_cls", copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns("predictions.npz", "checkpoints"))
    out = snakemake(clone, "-n").stdout
    assert "Job stats:" in out, out[-2000:]  # without predictions.npz among the targets: "Nothing to be done"
    table = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]  # job / count rows up to the blank line
    jobs = {l.split()[0]: int(l.split()[1]) for l in table}
    assert jobs.get("toy_vit") == 1 and jobs.get("train_cls") == 3, out[-2000:]  # the three runs of ci_cls.yaml


def test_one_summary_covers_both_tracks(tmp_path):
    """With t2i and cls runs configured, the tables job reads both tracks' metrics files (dry run)."""
    cfg = tmp_path / "both.yaml"
    text = (REPO / "config" / "ci.yaml").read_text() + "\ncls_benchmarks: [toy_imagenet_r]\ncls_methods: [ft]\ncls_n_tasks: [2]\n"
    cfg.write_text(text)
    res = snakemake(tmp_path, "-n", "-p", config=cfg)
    out = res.stdout + res.stderr
    line = next(l for l in out.splitlines() if "continual-bench tables" in l)
    assert "runs/toy_faces/T2/lora_sequential/seed0/metrics.csv" in line
    assert "runs/toy_imagenet_r/T2/ft/seed0/metrics.csv" in line
    bad = snakemake(tmp_path, "-n", "--config", "cls_benchmarks=[toy_imagenet]", config=cfg, check=False)
    assert bad.returncode != 0 and "toy_imagenet" in bad.stdout + bad.stderr
