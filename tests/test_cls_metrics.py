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


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_metric_weights_are_the_metrics(T):
    """sampling_sd propagates through sum(W * acc): W must give exactly A_N, F_N, F_avl and P_N."""
    acc = np.tril(np.random.default_rng(T).uniform(0, 100, (T, T)))
    acc[np.triu_indices(T, 1)] = NAN
    for metric, fn in [("A_N", M.average_accuracy), ("P_N", M.plasticity), ("F_N", M.forgetting_coda),
                       ("F_avl", M.forgetting_avalanche)]:
        if T < 2 and metric.startswith("F"):
            continue
        W = M.metric_weights(metric, T)
        assert not W[np.isnan(acc)].any()  # no weight on a cell that is never evaluated
        assert np.sum(W * np.nan_to_num(acc)) == pytest.approx(fn(acc))


# two tasks of 4 test images; rows: after task 1, after task 2 (-1: task 2 not evaluated yet)
LABEL = np.array([0, 0, 0, 0, 1, 1, 1, 1])
TASK = np.array([1, 1, 1, 1, 2, 2, 2, 2])
PRED = np.array([[0, 0, 0, 1, -1, -1, -1, -1],    # task 1: 3 of 4 right (75)
                 [0, 1, 1, 1, 1, 1, 1, 0]])       # task 1: 1 of 4 (25); task 2: 3 of 4 (75)
ACC2 = np.array([[75.0, NAN], [25.0, 75.0]])


def test_sampling_sd_by_hand():
    from_matrix = M.sampling_sd(ACC2, [4, 4])
    # A_N = (acc[1][0] + acc[1][1]) / 2: var = (1/4) (25 * 75 / 4 + 75 * 25 / 4) = 234.375; P_N likewise
    assert from_matrix["A_N"] == pytest.approx(math.sqrt(234.375))
    assert from_matrix["P_N"] == pytest.approx(math.sqrt(234.375))
    # F_avl = F_N = acc[0][0] - acc[1][0], cells taken as independent: 75 * 25 / 4 + 25 * 75 / 4 = 937.5
    assert from_matrix["F_avl"] == pytest.approx(math.sqrt(937.5)) and from_matrix["F_N"] == from_matrix["F_avl"]
    paired = M.sampling_sd(ACC2, [4, 4], correct=PRED == LABEL, task=TASK)
    # one cell per task: the same as the matrix's form
    assert paired["A_N"] == pytest.approx(from_matrix["A_N"]) and paired["P_N"] == pytest.approx(from_matrix["P_N"])
    # paired: per image 100 * (right after task 1 - right after task 2) = [0, 100, 100, 0]: var 2500, / 4 images
    assert paired["F_avl"] == pytest.approx(25.0) and paired["F_N"] == pytest.approx(25.0)
    joint = np.array([[NAN, NAN], [25.0, 75.0]])  # a joint run: A_N only
    assert set(M.sampling_sd(joint, [4, 4])) == {"A_N"}


def test_run_sampling_sd_reads_predictions_that_match_the_matrix(tmp_path, caplog):
    ident = {"track": "cls", "benchmark": "b", "n_tasks": 2, "method": "ft", "seed": 0}
    M.write_cls_results(ACC2, n_test=[4, 4], n_train=1.0, n_store=1.0, ident=ident, provenance={},
                        out_metrics=tmp_path / "metrics.csv", out_acc=tmp_path / "acc_matrix.csv")
    sd, source = M.run_sampling_sd(tmp_path)
    assert source == "acc_matrix" and sd["F_avl"] == pytest.approx(math.sqrt(937.5))
    np.savez(tmp_path / "predictions.npz", pred=PRED, label=LABEL, task=TASK)
    sd, source = M.run_sampling_sd(tmp_path)
    assert source == "predictions" and sd["F_avl"] == pytest.approx(25.0)
    other = PRED.copy()
    other[1, 0] = 1  # another run's predictions: task 1 at 0 % after task 2, not 25 %
    np.savez(tmp_path / "predictions.npz", pred=other, label=LABEL, task=TASK)
    sd, source = M.run_sampling_sd(tmp_path)
    assert source == "acc_matrix" and "does not match" in caplog.text


def test_run_sampling_sd_never_guesses_the_test_set_size(tmp_path, caplog):
    ident = {"track": "cls", "benchmark": "b", "n_tasks": 2, "method": "ft", "seed": 0}
    M.write_cls_results(ACC2, n_test=None, n_train=1.0, n_store=1.0, ident=ident, provenance={},
                        out_metrics=tmp_path / "metrics.csv", out_acc=tmp_path / "acc_matrix.csv")
    assert M.run_sampling_sd(tmp_path) == ({}, "none") and "n_test" in caplog.text
    pd.read_csv(tmp_path / "acc_matrix.csv").drop(columns="n_test").to_csv(tmp_path / "acc_matrix.csv", index=False)
    assert M.run_sampling_sd(tmp_path) == ({}, "none")
