"""The whole DAG on a minimal config in a temporary directory: tables, a no-op second run, kill + resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from continual_bench.utils import weights_fingerprint

REPO = Path(__file__).resolve().parent.parent
CI_CONFIG = REPO / "config" / "ci.yaml"


def snakemake(workdir: Path, *args: str, timeout: int = 400, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(CI_CONFIG), "--cores", "2", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and res.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in workdir.rglob("*.log"))
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stderr[-6000:]}\n{logs}")
    return res


def _env() -> dict:
    # conftest.py has already pointed every cache into the repository's .cache/
    return dict(os.environ, CONTINUAL_BENCH_NO_TQDM="1")


@pytest.fixture(scope="module")
def dag(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dag")
    snakemake(work)
    return work


def test_tables_and_summary(dag):
    res = dag / "results" / "ci"
    summary = pd.read_csv(res / "summary.csv")
    assert list(summary.columns) == ["track", "benchmark", "n_tasks", "method", "metric", "mean", "std", "n_seeds"]
    metrics = set(summary.metric)
    assert {"A_mmd", "F_mmd", "A_clip", "F_clip", "N_train", "N_store", "P_oracle", "A_oracle", "F_oracle",
            "P_mmd", "P_clip", "takeover", "P_clip_t", "A_clip_t", "F_clip_t", "Frel_mmd", "Frel_clip",
            "Frel_clip_t", "takeover_base", "takeover_generic"} <= metrics
    row = summary[(summary.metric == "N_train")].iloc[0]
    assert (row.track, row.benchmark, row.n_tasks, row.method, row.n_seeds) == ("t2i", "toy_faces", 2, "lora_sequential", 1)
    assert row["mean"] > 0
    table = pd.read_csv(res / "tables" / "toy_faces_T2.csv")
    assert list(table.method) == ["lora_sequential", "noise floor"] and table.n_seeds.tolist()[0] == 1
    tex = (res / "tables" / "toy_faces_T2.tex").read_text()
    assert "\\toprule" in tex and "lora\\_sequential" in tex and "A_mmd" not in tex.replace("A\\_mmd", "")
    assert (res / "figures" / "samples" / "toy_faces_T2_lora_sequential_seed0.png").stat().st_size > 1000
    for kind in ("forgetting", "heatmap"):
        assert (res / "figures" / "summary" / f"{kind}_toy_faces_T2_oracle.png").stat().st_size > 1000
        assert (res / "figures" / "summary" / f"{kind}_toy_faces_T2_oracle.pdf").is_file()
    assert "run_name: ci" in (res / "config.yaml").read_text()
    R = pd.read_csv(res / "runs/toy_faces/T2/lora_sequential/seed0/R.csv")
    generic = R[R.concept_index == 0]
    assert set(generic.after_task) == {0, 2} and set(generic.concept) == {"generic"}
    per_run = pd.read_csv(res / "runs/toy_faces/T2/lora_sequential/seed0/metrics.csv")
    for col in ("config_hash", "git_commit", "packages", "seed"):
        assert per_run[col].notna().all() and col in per_run
    assert "torch=" in per_run.packages.iloc[0]
    # which models the numbers came from: byte-level fingerprints of the backbone the run trained, judge and oracle
    toy = dag / "resources" / "toy"
    train = json.loads((res / "runs/toy_faces/T2/lora_sequential/seed0/train.json").read_text())
    assert train["backbone_weights"] == weights_fingerprint(toy / "sd-tiny")
    fps = {role: weights_fingerprint(toy / sub) for role, sub in
           (("backbone", "sd-tiny"), ("judge", "judge"), ("oracle", "oracle/toy_faces"))}
    assert set(per_run.weights) == {f"backbone={fps['backbone']};judge={fps['judge']};oracle={fps['oracle']}"}


def test_every_job_leaves_a_benchmark_file_for_profile(dag, capsys):
    """Each rule names a benchmark file beside its log: Snakemake's wall and CPU time and peak memory of the job."""
    from continual_bench.cli import main

    res = dag / "results" / "ci"
    run = res / "runs/toy_faces/T2/lora_sequential/seed0/logs"
    expected = [run / f"{step}.tsv" for step in ("train", "generate", "evaluate")]
    expected += [res / "logs/tables.tsv", res / "logs/noise_floor_toy_faces.tsv"]
    expected += [dag / f"logs/toy/{n}.tsv" for n in ("data_toy_faces", "tokenizer", "vae", "text_encoder", "t2i",
                                                       "judge", "oracle_toy_faces")]
    for path in expected:
        head, row = path.read_text().splitlines()[:2]
        assert head.split("\t")[0] == "s" and float(row.split("\t")[0]) > 0, path
    assert main(["profile", str(res), "--shared", str(dag / "logs/toy"), "--cores", "2"]) in (0, None)
    out = capsys.readouterr().out
    n = len(list(res.rglob("logs/*.tsv"))) + len(list((dag / "logs/toy").glob("*.tsv")))
    assert n >= len(expected) and out.startswith(f"{n} jobs, ") and "toy/t2i" in out and "lora_sequential" in out


def test_second_run_has_nothing_to_do(dag):
    res = snakemake(dag, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.parametrize("stats, first_rerun", [("sd-tiny/pretrain_stats.json", "train"),
                                                 ("judge/train_stats.json", "evaluate")])
def test_retrained_toy_model_invalidates_what_used_it(dag, stats, first_rerun):
    """A retrained backbone (or judge) has new weights but the same config.json / model_index.json; the runs
    must depend on a file that changes with every training, or Snakemake's checksum check keeps old runs."""
    path = dag / "resources" / "toy" / stats
    before, st = path.read_bytes(), path.stat()
    try:
        path.write_text(path.read_text().replace('"seconds":', '"seconds": 1, "was":'))
        res = snakemake(dag, "-n")
        out = res.stdout + res.stderr
        assert f"rule {first_rerun}:" in out and "rule toy_t2i:" not in out and "rule toy_judge:" not in out
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(dag, "-n"))


def _values(path: Path) -> pd.Series:
    df = pd.read_csv(path)
    return df.set_index("metric")["value"]


def test_kill_in_train_generate_and_evaluate_resumes_with_identical_metrics(dag):
    """Fault injection: SIGKILL to the whole job tree at a random point inside each of train, generate and evaluate,
    then the documented recovery (`snakemake --unlock`, `snakemake --cores N --rerun-incomplete`): the metric files
    equal an uninterrupted run's, to the digit, and the training log keeps every attempt."""
    import random

    seed = int(os.environ.get("CONTINUAL_BENCH_FAULT_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    # Only the run's metric files are requested (no tables or figures): this test is about resuming.
    over = ["n_tasks=[3]", "method_settings={lora_sequential: {steps: 25, batch_size: 4, rank: 2}}"]
    run = "runs/toy_faces/T3/lora_sequential/seed0"
    targets = {name: [f"results/{name}/{run}/metrics.csv", f"results/{name}/{run}/R.csv"]
               for name in ("resume", "straight")}
    out = dag / f"results/resume/{run}"
    ckpt = out / "checkpoints"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(dag),
           "--configfile", str(CI_CONFIG), "--cores", "2", "--rerun-incomplete", "--config", "run_name=resume", *over,
           "--", *targets["resume"]]
    phases = [  # (job, a file that shows it is running, its output, the latest kill after that file appears)
        ("train", lambda: list(ckpt.glob("*/task_001/meta.json")), out / "train.json", 1.0),
        ("generate", lambda: (out / "logs" / "generate.log").is_file(), out / "samples.npz", 1.5),
        ("evaluate", lambda: (out / "logs" / "evaluate.log").is_file(), out / "metrics.csv", 1.5),
    ]
    # the uninterrupted reference runs beside the kill phases (its own run name and session; the phases leave a core
    # idle: one job at a time, one thread each)
    straight = subprocess.Popen([*cmd[:cmd.index("--config")], "--nolock", "--config", "run_name=straight", *over, "--",
                                 *targets["straight"]], stdout=subprocess.DEVNULL,
                                stderr=(straight_log := open(dag / "straight.stderr", "w")), env=_env(),
                                start_new_session=True)
    try:
        for i, (job, running, output, latest) in enumerate(phases):
            last = i == len(phases) - 1
            # the documented recovery (--unlock) after the last kill; the earlier phases take no lock, which spares
            # a Snakemake start per phase (seconds each)
            at = cmd.index("--config")
            proc = subprocess.Popen(cmd if last else [*cmd[:at], "--nolock", *cmd[at:]], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
            deadline = time.time() + 240
            while not running():
                assert proc.poll() is None, f"snakemake ended before {job} started (fault seed {seed})"
                assert time.time() < deadline, f"{job} did not start in time (fault seed {seed})"
                time.sleep(0.05)
            time.sleep(rng.uniform(0, latest))
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job tree, as a crash or scancel would
            proc.wait()
            assert not output.exists(), f"{job} had finished before the kill (fault seed {seed})"
            assert job != "train" or not list(ckpt.glob("*/task_003")), f"the kill came after the last task ({seed})"
        assert list((dag / ".snakemake" / "locks").glob("*")), "the killed Snakemake left no lock to recover from"
        snakemake(dag, "--unlock", "--config", "run_name=resume", *over)
        snakemake(dag, "--rerun-incomplete", "--config", "run_name=resume", *over, "--", *targets["resume"])
        log = (out / "logs" / "train.log").read_text()  # appended: the killed attempt's lines are kept
        assert re.search(r"task 1 \(\w+\): loss", log) and "checkpoint found, skipping" in log, log
        assert log.count(" train on ") >= 2
        rc = straight.wait(timeout=400)
    finally:
        if straight.poll() is None:
            os.killpg(straight.pid, signal.SIGKILL)
        straight_log.close()
    assert rc == 0, (dag / "straight.stderr").read_text()[-6000:]
    resumed = _values(dag / f"results/resume/{run}/metrics.csv")
    straight = _values(dag / f"results/straight/{run}/metrics.csv")
    pd.testing.assert_series_equal(resumed, straight)  # the same seed gives the same metrics, to the digit
    cols = ["after_task", "concept_index", "metric", "value"]
    pd.testing.assert_frame_equal(pd.read_csv(dag / f"results/resume/{run}/R.csv")[cols],
                                  pd.read_csv(dag / f"results/straight/{run}/R.csv")[cols])


def test_default_config_plans_5_10_20_task_sequences(tmp_path):
    """Every length x seed is planned; each train job looks for states to reuse in its own results folder and in
    every folder of reuse_states_from, each passed as one literal argument (never run as shell code)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "2", "-n", "-p",
           "--config", "n_tasks=[5,10,20]", "reuse_states_from=['other results/$(touch PWNED)']"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    n_seeds = 3
    for rule in ("train", "generate", "evaluate"):
        line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == rule)
        assert int(line.split()[1]) == 3 * n_seeds, line
    trains = [ln for ln in out.splitlines() if " train --backbone " in ln]
    assert len(trains) == 3 * n_seeds
    for ln in trains:
        assert "--reuse-states-from results/toy --reuse-states-from 'other results/$(touch PWNED)' " in ln, ln


RUN = Path("results/ci/runs/toy_faces/T2/lora_sequential/seed0")


def test_deleted_metrics_file_is_rebuilt_not_dropped(dag):
    """A run's metrics.csv is a target of the DAG itself: deleting it plans its evaluation again (as only an input of
    the tables, Snakemake said "Nothing to be done" and the tables would have lost the run)."""
    metrics = dag / RUN / "metrics.csv"
    aside = metrics.with_name("metrics.aside")
    st = metrics.stat()
    os.replace(metrics, aside)
    try:
        out = (lambda r: r.stdout + r.stderr)(snakemake(dag, "-n"))
        assert "rule evaluate:" in out and "Nothing to be done" not in out
    finally:
        os.replace(aside, metrics)
        os.utime(metrics, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_failed_evaluate_keeps_the_last_good_metrics(dag):
    """A truncated samples.npz: the evaluation fails with one line naming the file and the repair, and the run's
    previous metrics.csv and R.csv stay (outputs flagged update(): Snakemake puts them back)."""
    run = dag / RUN
    samples = run / "samples.npz"
    good, st = samples.read_bytes(), samples.stat()
    before = {name: (run / name).read_bytes() for name in ("metrics.csv", "R.csv")}
    try:
        samples.write_bytes(good[: len(good) // 2])  # newer than the metrics: the evaluation runs again
        res = snakemake(dag, "--", str(RUN / "metrics.csv"), check=False)
        assert res.returncode != 0
        log = (run / "logs" / "evaluate.log").read_text()
        err = [ln for ln in log.splitlines() if ln.startswith("continual-bench: error:")]
        assert len(err) == 1 and f"{RUN / 'samples.npz'}: unreadable or truncated samples file" in err[0], log[-2000:]
        assert "repair: delete" in err[0] and "Traceback" not in log
        assert {name: (run / name).read_bytes() for name in before} == before
    finally:
        samples.write_bytes(good)
        os.utime(samples, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rules_never_read_the_total_cores_when_parsed():
    """`workflow.cores` raises under a cluster executor (no --cores), and a rule's `threads:` is read when the
    Snakefile is parsed, so one such rule stops every cluster run, even of jobs that never reach it (stop 23's
    live SLURM check failed so; a dry run does not show it). A rule that wants the whole machine names a number."""
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in [REPO / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*threads:\s*[^#]*\bworkflow\.cores\b", line)]
    assert not offenders, offenders
