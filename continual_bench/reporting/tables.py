"""Paper tables from the seed summary: one wide CSV and one booktabs LaTeX table per
(track, benchmark, n_tasks).

Cells show ``mean ± std`` (sample std over seeds, ddof=1). The best mean per column is bold
(highest for "max" metrics, lowest for "min" metrics; see summary.direction). When the
per-seed values are given, methods whose seeds are not significantly different from the
best method's are underlined: Welch's t-test (unequal variances),

    t = (mean_a - mean_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b),

with Welch-Satterthwaite degrees of freedom, two-sided p >= 0.05, and only when both
methods have >= 2 seeds.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from continual_bench.reporting.summary import SUMMARY_COLUMNS, direction
from continual_bench.utils import UserError, atomic_path, atomic_write_text

PREFERRED_ORDER = {
    "t2i": ["N_train", "N_store", "P_mmd", "A_mmd", "F_mmd", "P_clip", "A_clip", "F_clip",
            "P_oracle", "A_oracle", "F_oracle", "takeover"],
    "cls": ["A_N", "F_N"],
}
ALPHA = 0.05
ARROW = {"max": r" $\uparrow$", "min": r" $\downarrow$", None: ""}
BOLD = "textbf:--rwrap;"
UNDERLINE = "underline:--rwrap;"

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (``_ & % $ # { } ~ ^ \\``) in plain text."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def order_metrics(metrics, track: str) -> list[str]:
    """Preferred paper order for ``track`` first, then any other metrics alphabetically."""
    metrics = list(dict.fromkeys(metrics))
    preferred = PREFERRED_ORDER.get(track, PREFERRED_ORDER["t2i"])
    return [m for m in preferred if m in metrics] + sorted(m for m in metrics if m not in preferred)


def format_count(x: float) -> str:
    """Parameter counts: ``999``, ``12.3K``, ``1.2M``, ``3.4B``."""
    if not math.isfinite(x):
        return "--"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{int(round(x))}"


def format_cell(metric: str, mean: float, std: float) -> str:
    """``"12.30 $\\pm$ 0.50"`` (2 decimals); parameter counts (``N_*``) as ``1.2M`` without std."""
    if metric.startswith("N_"):
        return format_count(mean)
    if mean is None or not math.isfinite(mean):
        return "--"
    if std is None or not math.isfinite(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} $\\pm$ {std:.2f}"


def _best_methods(col: pd.Series, how: str | None) -> list[str]:
    """Methods whose mean equals the best mean of the column (ties all count)."""
    col = col.dropna()
    if how is None or col.empty:
        return []
    best = col.max() if how == "max" else col.min()
    return [m for m, v in col.items() if np.isclose(v, best, rtol=1e-12, atol=0.0)]


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (scipy ``ttest_ind(equal_var=False)``);
    NaN when either sample has < 2 values or the test is undefined (both variances 0)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _not_significant(per_seed: pd.DataFrame | None, metric: str, best: str, others) -> list[str]:
    """Methods in ``others`` whose seeds are not significantly different from ``best``'s (p >= ALPHA)."""
    if per_seed is None:
        return []
    values = per_seed[per_seed["metric"] == metric].groupby("method")["value"]
    groups = {m: v.to_numpy() for m, v in values}
    if best not in groups:
        return []
    out = []
    for m in others:
        if m in groups:
            p = welch_p(groups[best], groups[m])
            if math.isfinite(p) and p >= ALPHA:
                out.append(m)
    return out


def _wide_csv(group: pd.DataFrame, methods: list[str], metrics: list[str]) -> pd.DataFrame:
    mean = group.pivot(index="method", columns="metric", values="mean").reindex(index=methods, columns=metrics)
    std = group.pivot(index="method", columns="metric", values="std").reindex(index=methods, columns=metrics)
    wide = pd.DataFrame(index=pd.Index(methods, name="method"))
    for m in metrics:
        wide[m] = mean[m]
        wide[f"{m}_std"] = std[m]
    return wide.reset_index()


def _caption(benchmark: str, n_tasks: int, n_seeds: pd.Series) -> str:
    lo, hi = int(n_seeds.min()), int(n_seeds.max())
    seeds = f"{hi} seed{'s' if hi != 1 else ''}" if lo == hi else f"{lo}--{hi} seeds"
    return f"{latex_escape(benchmark)}, {n_tasks} tasks, mean $\\pm$ std over {seeds}"


def _latex(group: pd.DataFrame, track: str, benchmark: str, n_tasks: int,
           methods: list[str], metrics: list[str], per_seed: pd.DataFrame | None) -> str:
    mean = group.pivot(index="method", columns="metric", values="mean").reindex(index=methods, columns=metrics)
    std = group.pivot(index="method", columns="metric", values="std").reindex(index=methods, columns=metrics)

    cells = pd.DataFrame(
        {m: [format_cell(m, mean.at[r, m], std.at[r, m]) for r in methods] for m in metrics},
        index=methods,
    )
    css = pd.DataFrame("", index=methods, columns=metrics)
    for m in metrics:
        best = _best_methods(mean[m], direction(m))
        for b in best:
            css.at[b, m] = BOLD
        if len(best) == 1:
            others = [r for r in methods if r not in best and math.isfinite(mean.at[r, m])]
            for r in _not_significant(per_seed, m, best[0], others):
                css.at[r, m] = UNDERLINE

    cells.columns = [latex_escape(m) + ARROW[direction(m)] for m in metrics]
    css.columns = cells.columns
    cells.columns.name = "Method"
    styler = cells.style.apply(lambda _: css, axis=None)
    styler = styler.format_index(escape="latex", axis=0)
    tex = styler.to_latex(
        hrules=True,
        column_format="l" + "c" * len(metrics),
        caption=_caption(benchmark, n_tasks, group["n_seeds"]),
        label=f"tab:{benchmark}_T{n_tasks}",
        position_float="centering",
    )
    header = f"% {track} / {benchmark} / T={n_tasks}: bold = best mean per column (arrow: better direction).\n"
    if per_seed is not None:
        header += (
            "% Underlined: not significantly different from the bold method "
            f"(Welch's t-test, two-sided p >= {ALPHA}, both methods with >= 2 seeds).\n"
        )
    return header + tex


def write_tables(summary_df: pd.DataFrame, out_dir: Path, per_seed_df: pd.DataFrame | None = None) -> list[Path]:
    """Write ``<benchmark>_T<n_tasks>.csv`` and ``.tex`` per (track, benchmark, n_tasks) into ``out_dir``.

    ``summary_df`` is the output of summarize(); ``per_seed_df`` (optional) is the long per-seed
    table from load_metrics(), used for the Welch underlining. If one (benchmark, n_tasks) occurs
    in several tracks, file names get a ``<track>_`` prefix. Returns the written paths.
    """
    missing = [c for c in SUMMARY_COLUMNS if c not in summary_df.columns]
    if missing:
        raise UserError(f"summary table lacks column(s) {', '.join(missing)}")
    out_dir = Path(out_dir)
    tracks_per_bench = summary_df.groupby(["benchmark", "n_tasks"])["track"].nunique()
    written: list[Path] = []
    for (track, benchmark, n_tasks), group in summary_df.groupby(["track", "benchmark", "n_tasks"], sort=True):
        if not _SAFE_NAME.match(str(benchmark)):
            raise UserError(f"benchmark name {benchmark!r} is not usable in a file name")
        n_tasks = int(n_tasks)
        methods = list(pd.unique(group["method"]))
        metrics = order_metrics(group["metric"], track)
        stem = f"{benchmark}_T{n_tasks}"
        if tracks_per_bench[(benchmark, n_tasks)] > 1:
            stem = f"{track}_{stem}"
        per_seed = None
        if per_seed_df is not None:
            sel = (
                (per_seed_df["track"] == track)
                & (per_seed_df["benchmark"] == benchmark)
                & (per_seed_df["n_tasks"] == n_tasks)
            )
            per_seed = per_seed_df[sel]

        csv_path = out_dir / f"{stem}.csv"
        with atomic_path(csv_path) as tmp:
            _wide_csv(group, methods, metrics).to_csv(tmp, index=False)
        tex_path = out_dir / f"{stem}.tex"
        atomic_write_text(tex_path, _latex(group, track, benchmark, n_tasks, methods, metrics, per_seed))
        written += [csv_path, tex_path]
    return written
