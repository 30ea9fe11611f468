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
import math

import numpy as np
import pandas as pd

from ..utils import atomic_write_text

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
