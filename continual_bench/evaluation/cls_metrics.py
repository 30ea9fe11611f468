"""Class-incremental metrics from the accuracy matrix, and the run's result files.

``acc[t][i]`` (0-based, T x T): top-1 accuracy in percent on task i's test images after training task t
(i <= t), with logits over every class seen after task t. Formulas (T = number of tasks):

* ``A_N``   = (1/T) sum_{i<T} acc[T-1][i]
  average accuracy after the last task, unweighted over tasks (CODA-Prompt's reported metric).
* ``F_N``   = 1/(T-1) sum_{t=1}^{T-1} (1/t) sum_{i<t} (acc[t-1][i] - acc[t][i])
  CODA-Prompt's forgetting (``utils/calc_forgetting.py``): the average one-step drop of the past tasks'
  accuracy when a new task is learned, averaged over the T-1 steps.
* ``F_avl`` = 1/(T-1) sum_{i<T-1} (acc[i][i] - acc[T-1][i])
  Avalanche-style forgetting: accuracy right after learning a task minus its final accuracy, averaged
  over the tasks before the last.
* ``P_N``   = (1/T) sum_i acc[i][i]
  plasticity: accuracy on each task right after learning it.

Larger F = more forgetting. F_N, F_avl and P_N need the full matrix: a joint run (upper bound, only the
last row) and a one-task run report A_N only.

Files a run writes (``write_cls_results``):

* ``acc_matrix.csv`` (long): ``track,benchmark,n_tasks,method,seed,after_task,task,acc,n_test`` + provenance
  columns; ``after_task`` and ``task`` 1-based; one row per (after_task >= task) that was evaluated.
* ``R.csv``: the same matrix in the text-to-image track's R-matrix format (``after_task, concept_index``
  = task, ``concept`` = "task<i>", ``metric`` = "acc", ``value``), which the reporting's figures read.
* ``metrics.csv`` (long, the t2i track's format): ``track,benchmark,n_tasks,method,seed,metric,value`` +
  provenance (``config_hash, git_commit, continual_bench, python, packages``); metrics ``A_N, F_N, F_avl,
  P_N, N_train, N_store`` (accuracies in percent; N_train = parameters trained per task, mean over tasks;
  N_store = parameters stored after the last task beyond the frozen backbone).
"""
from __future__ import annotations

import io
import logging
import math

import numpy as np
import pandas as pd

from ..utils import atomic_write_text

log = logging.getLogger(__name__)
CLS_METRICS = ("A_N", "F_N", "F_avl", "P_N", "N_train", "N_store")


def _check(acc) -> np.ndarray:
    acc = np.asarray(acc, dtype=float)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {acc.shape}")
    return acc


def average_accuracy(acc) -> float:
    acc = _check(acc)
    return float(np.mean(acc[-1, :]))


def forgetting_coda(acc) -> float:
    acc = _check(acc)
    T = acc.shape[0]
    if T < 2:
        return math.nan
    total = 0.0
    for t in range(1, T):
        total += sum(acc[t - 1, i] - acc[t, i] for i in range(t)) / t
    return float(total / (T - 1))


def forgetting_avalanche(acc) -> float:
    acc = _check(acc)
    T = acc.shape[0]
    if T < 2:
        return math.nan
    return float(np.mean([acc[i, i] - acc[T - 1, i] for i in range(T - 1)]))


def plasticity(acc) -> float:
    acc = _check(acc)
    return float(np.mean(np.diag(acc)))


def summarize_acc(acc, full: bool = True) -> dict[str, float]:
    """A_N always; F_N, F_avl, P_N when the matrix is complete (``full``) and T >= 2 (P_N: T >= 1)."""
    out = {"A_N": average_accuracy(acc)}
    if full:
        out["P_N"] = plasticity(acc)
        if _check(acc).shape[0] >= 2:
            out["F_N"] = forgetting_coda(acc)
            out["F_avl"] = forgetting_avalanche(acc)
    return out


def metric_weights(metric: str, T: int) -> np.ndarray:
    """The T x T weights ``W`` with ``metric(acc) = sum(W * acc)``: ``A_N``, ``F_N``, ``F_avl`` and ``P_N`` are all
    linear in the accuracy matrix (the formulas above), which is what :func:`sampling_sd` propagates through."""
    W = np.zeros((T, T))
    if metric == "A_N":
        W[T - 1, :] = 1.0 / T
    elif metric == "P_N":
        W[np.arange(T), np.arange(T)] = 1.0 / T
    elif metric == "F_N" and T >= 2:
        for t in range(1, T):
            W[t - 1, :t] += 1.0 / (t * (T - 1))
            W[t, :t] -= 1.0 / (t * (T - 1))
    elif metric == "F_avl" and T >= 2:
        for i in range(T - 1):
            W[i, i] += 1.0 / (T - 1)
            W[T - 1, i] -= 1.0 / (T - 1)
    else:
        raise ValueError(f"no linear weights for metric {metric!r} at T={T}")
    return W


def sampling_sd(acc, n_test, correct=None, task=None) -> dict[str, float]:
    """The test-set sampling standard deviation of each accuracy metric of one run, in percentage points.

    The metrics are means over a finite test set (``n_test[i]`` images of task ``i``): another draw of the test
    images would move them by about this much even if the model did not change. It is the classification track's
    noise floor, the counterpart of the text-to-image track's ``noise_floor.csv`` (the resolution of the metric at the
    evaluation's set size). With ``metric = sum(W * acc)`` (:func:`metric_weights`):

    * ``correct`` given (``T x N`` booleans: image ``k`` classified right after task ``t``; ``task[k]`` its 1-based
      task, from ``predictions.npz``): each image of task ``i`` adds ``z_k = 100 * sum_t W[t, i] * correct[t, k]``
      / ``n_i`` to the metric, so ``Var = sum_i var_k(z_k) / n_i`` (population variance over the task's images).
      This keeps the pairing of a difference such as ``acc[i][i] - acc[T-1][i]``: both are scored on the same images.
    * otherwise, from the accuracy matrix alone: each cell is a binomial proportion, cells taken as independent,
      ``Var = sum_{t,i} W[t,i]^2 * acc[t,i] * (100 - acc[t,i]) / n_i``. For ``A_N`` and ``P_N`` (one cell per task)
      this equals the form above; for the forgetting metrics it ignores the positive correlation of two accuracies on
      the same images, so it overstates their sd.

    Metrics whose cells were not all evaluated (a joint run has only the last row) are left out.
    """
    acc = _check(acc)
    T = acc.shape[0]
    n = np.asarray(n_test, dtype=float)
    out = {}
    for metric in ("A_N", "F_N", "F_avl", "P_N"):
        if T < 2 and metric in ("F_N", "F_avl"):
            continue
        W = metric_weights(metric, T)
        used = W != 0
        if np.isnan(acc[used]).any():
            continue
        if correct is not None:
            correct = np.asarray(correct, dtype=float)
            task = np.asarray(task)
            var = 0.0
            for i in range(T):
                cols = task == i + 1
                z = 100.0 * W[:, i] @ correct[:, cols]
                var += float(np.var(z)) / max(int(cols.sum()), 1)
        else:
            cell = np.where(used, np.nan_to_num(acc) * (100.0 - np.nan_to_num(acc)), 0.0)
            var = float(np.sum(W ** 2 * cell / n[None, :]))
        out[metric] = math.sqrt(max(var, 0.0))
    return out


def run_sampling_sd(run_dir) -> tuple[dict[str, float], str]:
    """:func:`sampling_sd` of one run folder (``acc_matrix.csv``, and ``predictions.npz`` where the run wrote one and
    it matches the matrix) -> (sd per metric, ``"predictions"`` or ``"acc_matrix"``: which form was used; ``{}`` and
    ``"none"`` when the matrix does not give every task's ``n_test``)."""
    from pathlib import Path

    from ..run_files import read_csv

    run_dir = Path(run_dir)
    mat = read_csv(run_dir / "acc_matrix.csv")
    T = int(mat["n_tasks"].iloc[0]) if "n_tasks" in mat.columns and len(mat) else int(mat["after_task"].max())
    acc = np.full((T, T), np.nan)
    n_test = np.full(T, np.nan)
    for r in mat.itertuples(index=False):
        acc[int(r.after_task) - 1, int(r.task) - 1] = float(r.acc)
        n_test[int(r.task) - 1] = float(getattr(r, "n_test", np.nan))
    if not (np.isfinite(n_test) & (n_test > 0)).all():  # the set sizes are what the sd scales with: never guess them
        log.warning("%s: no n_test for every task, so no sampling sd", run_dir / "acc_matrix.csv")
        return {}, "none"
    pred_path = run_dir / "predictions.npz"
    if pred_path.is_file():
        try:
            with np.load(pred_path) as z:
                pred, label, task = z["pred"], z["label"], z["task"]
        except (OSError, ValueError, KeyError):
            pred = None
        if pred is not None and pred.shape[0] == T:
            correct = pred == label[None, :]
            seen = pred >= 0
            # the predictions are this matrix's: same evaluated cells, same accuracies (to the CSV's 6 digits)
            ok = True
            for t in range(T):
                for i in range(T):
                    cols = task == i + 1
                    if np.isnan(acc[t, i]):
                        ok &= not seen[t, cols].any()
                    else:
                        ok &= bool(cols.any()) and abs(100.0 * correct[t, cols].mean() - acc[t, i]) < 1e-3
            if ok:
                return sampling_sd(acc, n_test, correct=correct, task=task), "predictions"
        log.warning("%s does not match %s (another run's predictions?): the sampling sd comes from the matrix alone",
                    pred_path, run_dir / "acc_matrix.csv")
    return sampling_sd(acc, n_test), "acc_matrix"


def write_cls_results(acc: np.ndarray, *, n_test: list[int] | None, n_train: float, n_store: float, ident: dict,
                      provenance: dict, out_metrics, out_acc, out_R=None, full: bool = True) -> pd.DataFrame:
    """Write ``metrics.csv``, ``acc_matrix.csv`` and (``out_R``) ``R.csv`` atomically; returns the metrics."""
    acc = _check(acc)
    T = acc.shape[0]
    summary = summarize_acc(acc, full=full)
    summary["N_train"] = float(n_train)
    summary["N_store"] = float(n_store)
    order = [m for m in CLS_METRICS if m in summary]
    metrics = pd.DataFrame([{**ident, "metric": m, "value": summary[m], **provenance} for m in order])
    cols = ["track", "benchmark", "n_tasks", "method", "seed", "metric", "value"]
    metrics = metrics[cols + [c for c in metrics.columns if c not in cols]]
    rows = [{**ident, "after_task": t + 1, "task": i + 1, "acc": acc[t, i],
             "n_test": (n_test[i] if n_test else None), **provenance}
            for t in range(T) for i in range(t + 1) if not np.isnan(acc[t, i])]
    mat = pd.DataFrame(rows)
    outs = [(metrics, out_metrics), (mat, out_acc)]
    if out_R is not None:
        R = pd.DataFrame([{"after_task": r["after_task"], "concept_index": r["task"], "concept": f"task{r['task']}",
                           "metric": "acc", "value": r["acc"], **ident, **provenance} for r in rows])
        outs.append((R, out_R))
    for df, path in outs:
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.6g")
        atomic_write_text(path, buf.getvalue())
    return metrics
