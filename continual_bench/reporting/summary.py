"""Aggregate per-run ``metrics.csv`` files (long format) into a mean ± std summary over seeds.

Every run writes one ``metrics.csv`` with one row per metric::

    track,benchmark,n_tasks,method,seed,metric,value,config_hash,git_commit,...

For each (track, benchmark, n_tasks, method, metric) the summary holds, over the seeds
``x_1 .. x_n`` (empty / NaN values are left out):

    mean = (1/n) * sum_i x_i
    std  = sqrt( sum_i (x_i - mean)^2 / (n - 1) )      (sample std, ddof=1; 0.0 when n == 1)
    n_seeds = n
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from continual_bench.utils import UserError, atomic_path

REQUIRED_COLUMNS = ["track", "benchmark", "n_tasks", "method", "seed", "metric", "value"]
KEY_COLUMNS = ["track", "benchmark", "n_tasks", "method", "metric"]
SUMMARY_COLUMNS = KEY_COLUMNS + ["mean", "std", "n_seeds"]

# Which way is better: "max" (higher is better), "min" (lower is better) or None (no ordering).
# Names not listed here are resolved by prefix in direction().
METRIC_DIRECTION: dict[str, str | None] = {
    "A_mmd": "min", "F_mmd": "min", "P_mmd": "min",
    "A_clip": "max", "F_clip": "min", "P_clip": "max",
    "A_oracle": "max", "F_oracle": "min", "P_oracle": "max",
    "N_train": None, "N_store": None,
    "takeover": "min", "takeover_base": None, "takeover_generic": "min",
    "A_N": "max", "F_N": "min",
}

# A_* / P_* metrics whose suffix names a distance are lower-is-better.
_DISTANCE_SUFFIXES = ("mmd", "kid", "fid")


def direction(metric: str) -> str | None:
    """``"max"``, ``"min"`` or ``None`` for a metric name.

    Exact entries of METRIC_DIRECTION first, then prefixes: ``F_*`` (forgetting) -> min;
    ``A_*`` / ``P_*`` -> max, except distances (``*_mmd``, ``*_kid``, ``*_fid``) -> min;
    ``N_*`` (parameter counts) -> None; anything else unknown -> None.
    """
    if metric in METRIC_DIRECTION:
        return METRIC_DIRECTION[metric]
    if metric.startswith(("F_", "Frel_")):
        return "min"
    if metric.startswith(("A_", "P_")):
        return "min" if metric.split("_", 1)[1].lower() in _DISTANCE_SUFFIXES else "max"
    return None


def _read_one(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"track": str, "benchmark": str, "method": str, "metric": str})
    except FileNotFoundError:
        raise UserError(f"{path}: metrics file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing required column(s) {', '.join(missing)}")
    for col in ("value", "n_tasks", "seed"):
        numeric = pd.to_numeric(df[col], errors="coerce")
        bad = numeric.isna() & df[col].notna()
        if col != "value":
            bad |= df[col].isna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise UserError(
                f"{path}: non-numeric {col} {df[col].iloc[i]!r} in row {i + 2} (metric {df['metric'].iloc[i]!r})"
            )
        df[col] = numeric
    for col in ("n_tasks", "seed"):
        if (df[col] != df[col].round()).any():
            raise UserError(f"{path}: column {col} must hold integers")
        df[col] = df[col].astype(int)
    for col in ("track", "benchmark", "method", "metric"):
        if df[col].isna().any():
            raise UserError(f"{path}: empty {col} in row {int(df[col].isna().to_numpy().nonzero()[0][0]) + 2}")
    return df


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    """Concatenate per-run metrics files (long format), in the order given.

    Raises UserError naming the file when a file lacks a required column
    (track, benchmark, n_tasks, method, seed, metric, value) or holds a non-numeric value,
    and naming the key when the same (track, benchmark, n_tasks, method, seed, metric)
    appears twice (the same run matched twice by the glob).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no metrics files given (the metrics glob matched nothing)")
    df = pd.concat([_read_one(p).assign(_file=str(p)) for p in paths], ignore_index=True)
    dup = df.duplicated(subset=KEY_COLUMNS + ["seed"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        same = (df[KEY_COLUMNS + ["seed"]] == first[KEY_COLUMNS + ["seed"]]).all(axis=1)
        key = ",".join(str(first[c]) for c in ["track", "benchmark", "n_tasks", "method", "seed", "metric"])
        raise UserError(f"duplicate metric row {key} in {', '.join(pd.unique(df.loc[same, '_file']))}")
    df = df.drop(columns="_file")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sample std (ddof=1) over seeds per (track, benchmark, n_tasks, method, metric).

    Columns exactly ``track, benchmark, n_tasks, method, metric, mean, std, n_seeds``.
    ``n_seeds`` counts non-missing values; ``std`` is 0.0 when n_seeds == 1.
    Rows are sorted by track, benchmark, n_tasks; methods and metrics keep their order of
    first appearance in ``df`` (deterministic for a given input order).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"metrics table lacks column(s) {', '.join(missing)}")
    grouped = df.groupby(KEY_COLUMNS, sort=False)["value"]
    out = grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count").reset_index()
    out.loc[out["n_seeds"] == 1, "std"] = 0.0
    out["n_seeds"] = out["n_seeds"].astype(int)
    # first-appearance rank for methods and metrics; sorted keys for the rest
    method_rank = {m: i for i, m in enumerate(pd.unique(df["method"]))}
    metric_rank = {m: i for i, m in enumerate(pd.unique(df["metric"]))}
    out["_m"] = out["method"].map(method_rank)
    out["_k"] = out["metric"].map(metric_rank)
    out = out.sort_values(["track", "benchmark", "n_tasks", "_m", "_k"], kind="stable")
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


def write_summary(metric_paths: list[Path], out_csv: Path) -> pd.DataFrame:
    """Load ``metric_paths``, summarize, write ``out_csv`` atomically; returns the summary."""
    summary = summarize(load_metrics(metric_paths))
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    return summary
