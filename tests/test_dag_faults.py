"""Fault injection on a tiny DAG (its own module, so pytest-xdist's loadfile runs it beside tests/test_dag.py: each
builds its tiny DAG once; together they were the suite's critical path)."""
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from test_dag import CI_CONFIG, REPO, _env, _values, snakemake


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    work = tmp_path_factory.mktemp("dag_faults")
    snakemake(work)
    return work


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
    for job, running, output, latest in phases:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                                start_new_session=True)
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
        snakemake(dag, "--unlock", "--config", "run_name=resume", *over)
    snakemake(dag, "--rerun-incomplete", "--config", "run_name=resume", *over, "--", *targets["resume"])
    log = (out / "logs" / "train.log").read_text()  # appended: the killed attempt's lines are kept
    assert re.search(r"task 1 \(\w+\): loss", log) and "checkpoint found, skipping" in log, log
    assert log.count(" train on ") >= 2
    snakemake(dag, "--config", "run_name=straight", *over, "--", *targets["straight"])
    resumed = _values(dag / f"results/resume/{run}/metrics.csv")
    straight = _values(dag / f"results/straight/{run}/metrics.csv")
    pd.testing.assert_series_equal(resumed, straight)  # the same seed gives the same metrics, to the digit
    cols = ["after_task", "concept_index", "metric", "value"]
    pd.testing.assert_frame_equal(pd.read_csv(dag / f"results/resume/{run}/R.csv")[cols],
                                  pd.read_csv(dag / f"results/straight/{run}/R.csv")[cols])
