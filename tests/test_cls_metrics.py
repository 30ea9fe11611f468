"""Classification metrics on a 3x3 accuracy matrix worked out by hand, and the files a run writes."""
import math

import numpy as np
import pandas as pd
import pytest

from continual_bench.evaluation import cls_metrics as M
from continual_bench.reporting.summary import load_metrics, summarize

NAN = float("nan")
# acc[t][i]: accuracy (%) on task i after training task t (0-based rows and columns)
ACC = np.array([[90.0, NAN, NAN],
                [70.0, 80.0, NAN],
                [50.0, 60.0, 85.0]])


def test_average_accuracy_after_last_task():
    # A_N = (50 + 60 + 85) / 3
    assert M.average_accuracy(ACC) == pytest.approx(65.0)


def test_coda_prompt_forgetting():
    # F = 1/(T-1) sum_{t=1}^{T-1} 1/t sum_{i<t} (acc[t-1][i] - acc[t][i])
    #   t=1: (90 - 70) / 1 = 20;  t=2: ((70 - 50) + (80 - 60)) / 2 = 20;  F = (20 + 20) / 2
    assert M.forgetting_coda(ACC) == pytest.approx(20.0)


def test_avalanche_forgetting_and_plasticity():
    # F_avl = mean over i < T-1 of acc[i][i] - acc[T-1][i] = ((90 - 50) + (80 - 60)) / 2
    assert M.forgetting_avalanche(ACC) == pytest.approx(30.0)
    # P_N = (90 + 80 + 85) / 3
    assert M.plasticity(ACC) == pytest.approx(85.0)


def test_the_two_forgetting_definitions_differ_when_drops_are_not_uniform():
    acc = np.array([[100.0, NAN, NAN], [0.0, 100.0, NAN], [0.0, 100.0, 100.0]])
    # CODA-P: (100/1 + (0 + 0)/2) / 2 = 50; Avalanche: ((100 - 0) + (100 - 100)) / 2 = 50
    assert M.forgetting_coda(acc) == pytest.approx(50.0)
    acc2 = np.array([[100.0, NAN, NAN], [100.0, 100.0, NAN], [0.0, 0.0, 100.0]])
    # CODA-P: (0 + (100 + 100)/2) / 2 = 50; Avalanche: (100 + 100) / 2 = 100
    assert M.forgetting_coda(acc2) == pytest.approx(50.0)
    assert M.forgetting_avalanche(acc2) == pytest.approx(100.0)


def test_single_task_and_joint_runs_report_average_accuracy_only():
    assert math.isnan(M.forgetting_coda(np.array([[70.0]])))
    assert M.summarize_acc(np.array([[70.0]])) == {"A_N": 70.0, "P_N": 70.0}
    joint = np.full((3, 3), NAN)
    joint[2] = [80.0, 70.0, 90.0]
    assert M.summarize_acc(joint, full=False) == {"A_N": 80.0}
    with pytest.raises(ValueError, match="square"):
        M.average_accuracy(np.zeros((2, 3)))


def test_result_files_have_the_t2i_long_format(tmp_path):
    ident = {"track": "cls", "benchmark": "toy_imagenet_r", "n_tasks": 3, "method": "coda_p", "seed": 1}
    prov = {"config_hash": "abc", "git_commit": "deadbeef", "continual_bench": "0.1.0", "python": "3.11",
            "packages": "torch=x"}
    M.write_cls_results(ACC, n_test=[30, 30, 30], n_train=1000.0, n_store=5000.0, ident=ident, provenance=prov,
                        out_metrics=tmp_path / "metrics.csv", out_acc=tmp_path / "acc_matrix.csv",
                        out_R=tmp_path / "R.csv")
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns[:7]) == ["track", "benchmark", "n_tasks", "method", "seed", "metric", "value"]
    assert {"config_hash", "git_commit", "packages"} <= set(metrics.columns)
    vals = metrics.set_index("metric")["value"]
    assert vals.to_dict() == pytest.approx({"A_N": 65.0, "F_N": 20.0, "F_avl": 30.0, "P_N": 85.0,
                                            "N_train": 1000.0, "N_store": 5000.0})
    mat = pd.read_csv(tmp_path / "acc_matrix.csv")
    assert len(mat) == 6 and set(mat.columns) >= {"after_task", "task", "acc", "n_test", "method", "seed"}
    assert mat.query("after_task == 3 and task == 1").acc.item() == 50.0
    R = pd.read_csv(tmp_path / "R.csv")  # the t2i R-matrix format the figures read
    assert set(R.metric) == {"acc"} and R.query("after_task == 2 and concept_index == 1").value.item() == 70.0
    assert (R.track == "cls").all()
    summary = summarize(load_metrics([tmp_path / "metrics.csv"]))  # the reporting code reads it unchanged
    assert set(summary.metric) == {"A_N", "F_N", "F_avl", "P_N", "N_train", "N_store"}
    assert summary.track.unique().tolist() == ["cls"]
