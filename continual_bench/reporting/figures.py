"""Figures: forgetting curves (metric of each concept after each task), R-matrix heatmaps, labelled sample grids
and the learning-forgetting trade-off. Panels of many methods are laid out in a grid of at most ``MAX_COLS``
columns, so a 16-method figure stays readable on a laptop screen.

Both save a PNG and (by default) a PDF next to it, each written atomically.
Curves show, per concept c and after task t, the mean over seeds of R[t, c] with a band of
± one sample std (ddof=1) when there are >= 2 seeds.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from continual_bench.reporting.summary import direction  # noqa: E402
from continual_bench.utils import UserError, atomic_path  # noqa: E402

R_MATRIX_COLUMNS = ["benchmark", "n_tasks", "method", "seed", "after_task", "concept_index", "metric", "value"]
MAX_COLS = 4  # panels per row


def _panel_grid(fig: Figure, n: int, **kw):
    """``n`` axes in rows of at most MAX_COLS; unused cells are hidden. Returns (flat axes, grid)."""
    cols = min(n, MAX_COLS)
    rows = -(-n // cols)
    grid = fig.subplots(rows, cols, squeeze=False, **kw)
    for ax in grid.flat[n:]:
        ax.set_visible(False)
    return list(grid.flat[:n]), grid


def _grid_size(n: int, w: float, h: float, extra_w: float = 0.8) -> tuple[float, float]:
    cols = min(n, MAX_COLS)
    return w * cols + extra_w, h * -(-n // cols)


def _save(fig: Figure, out_path: Path, pdf: bool) -> list[Path]:
    """Save ``fig`` as ``out_path`` with suffix .png (and .pdf), atomically; return the paths."""
    out_path = Path(out_path)
    written = []
    for fmt in ("png", "pdf") if pdf else ("png",):
        path = out_path.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            # no creation date in the PDF: regenerating the figures from the same metrics gives the same bytes
            meta = {"CreationDate": None} if fmt == "pdf" else {}
            fig.savefig(tmp, format=fmt, dpi=150, metadata=meta)  # constrained layout sets the margins
        written.append(path)
    return written


def forgetting_curves(r_matrix_df: pd.DataFrame, out_path: Path, metric: str, pdf: bool = True) -> list[Path]:
    """One subplot per method; in each, one line per concept (concept_index = the task that
    learned it) of ``metric`` vs ``after_task`` (1-based), mean over seeds ± sample std band.

    ``r_matrix_df`` is long: benchmark, n_tasks, method, seed, after_task, concept_index, metric, value,
    for a single (benchmark, n_tasks). Returns the written paths (PNG, PDF).
    """
    missing = [c for c in R_MATRIX_COLUMNS if c not in r_matrix_df.columns]
    if missing:
        raise UserError(f"R-matrix table lacks column(s) {', '.join(missing)}")
    df = r_matrix_df[r_matrix_df["metric"] == metric]
    if df.empty:
        raise UserError(f"R-matrix table has no rows for metric {metric!r}")
    settings = df[["benchmark", "n_tasks"]].drop_duplicates()
    if len(settings) != 1:
        raise UserError(f"forgetting_curves needs one (benchmark, n_tasks), got {len(settings)} for metric {metric!r}")
    benchmark, n_tasks = settings.iloc[0]
    stats = (
        df.groupby(["method", "concept_index", "after_task"], sort=True)["value"]
        .agg(mean="mean", std=lambda v: v.std(ddof=1), n="count")
        .reset_index()
    )
    methods = list(pd.unique(df["method"]))
    concepts = sorted(stats["concept_index"].unique())
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(concepts), 1)))

    fig = Figure(figsize=_grid_size(len(methods), 3.2, 3.0, 1.6), layout="constrained")
    axes, grid = _panel_grid(fig, len(methods), sharey=True)
    for ax, method in zip(axes, methods):
        for color, c in zip(colors, concepts):
            s = stats[(stats["method"] == method) & (stats["concept_index"] == c)]
            if s.empty:
                continue
            x, y = s["after_task"].to_numpy(), s["mean"].to_numpy()
            ax.plot(x, y, marker="o", ms=3, color=color, label=f"concept {c}")
            band = (s["n"] >= 2).to_numpy()
            if band.any():
                sd = s["std"].to_numpy()
                ax.fill_between(x[band], (y - sd)[band], (y + sd)[band], color=color, alpha=0.15, lw=0)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("after task")
        ax.set_xticks(range(1, int(n_tasks) + 1))
        ax.grid(alpha=0.3)
    better = {"max": " (higher is better)", "min": " (lower is better)"}.get(direction(metric), "")
    for row in grid:
        row[0].set_ylabel(metric + better)
    grid[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{benchmark}, {int(n_tasks)} tasks: {metric} per concept (mean over seeds)", fontsize=10)
    return _save(fig, out_path, pdf)


def sample_grid(images: np.ndarray, row_labels, col_labels, out_path: Path, title: str,
                present: np.ndarray | None = None, pdf: bool = True) -> list[Path]:
    """A labelled grid of samples: ``images`` is uint8 of shape (rows, cols, H, W, 3), rows =
    concepts, columns = "after task t". Cells where ``present`` (bool, (rows, cols)) is False are
    left empty. Returns the written paths (PNG, PDF).
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise UserError(f"sample_grid images must have shape (rows, cols, H, W, 3), got {images.shape}")
    rows, cols = images.shape[:2]
    if len(row_labels) != rows or len(col_labels) != cols:
        raise UserError(
            f"sample_grid got {len(row_labels)} row / {len(col_labels)} column labels for a {rows}x{cols} grid"
        )
    present = np.ones((rows, cols), bool) if present is None else np.asarray(present, bool)
    if present.shape != (rows, cols):
        raise UserError(f"sample_grid present mask has shape {present.shape}, expected {(rows, cols)}")

    fig = Figure(figsize=(1.1 * cols + 1.2, 1.1 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if present[i, j]:
                ax.imshow(images[i, j].astype(np.uint8), interpolation="nearest")
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
            if i == 0:
                ax.set_title(str(col_labels[j]), fontsize=8)
            if j == 0:
                ax.set_ylabel(str(row_labels[i]), fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_path, pdf)


def r_matrix_heatmap(r_matrix_df: pd.DataFrame, out_path: Path, metric: str, pdf: bool = True) -> list[Path]:
    """One heatmap per method of R[t][k] (rows: after task t, columns: concept/task k), mean over seeds.

    Cells that were not evaluated (k > t, or outside the default evaluation when the full matrix is off)
    are blank; every evaluated cell is annotated with its value. Same long input as forgetting_curves.
    """
    missing = [c for c in R_MATRIX_COLUMNS if c not in r_matrix_df.columns]
    if missing:
        raise UserError(f"R-matrix table lacks column(s) {', '.join(missing)}")
    df = r_matrix_df[(r_matrix_df["metric"] == metric) & (r_matrix_df["concept_index"] > 0)]
    if df.empty:
        raise UserError(f"R-matrix table has no rows for metric {metric!r}")
    benchmark, n_tasks = df[["benchmark", "n_tasks"]].drop_duplicates().iloc[0]
    T = int(n_tasks)
    methods = list(pd.unique(df["method"]))
    mean = df.groupby(["method", "after_task", "concept_index"])["value"].mean()
    how = direction(metric)
    cmap = matplotlib.colormaps["viridis" if how != "min" else "viridis_r"]
    lo, hi = float(df["value"].min()), float(df["value"].max())
    fig = Figure(figsize=_grid_size(len(methods), 2.9, 2.7 + 0.05 * T, 1.0), layout="constrained")
    axes, panels = _panel_grid(fig, len(methods))
    im = None
    for ax, method in zip(axes, methods):
        grid = np.full((T, T), np.nan)
        for (t, k), v in mean[method].items():
            grid[int(t) - 1, int(k) - 1] = v
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi)
        if T <= 10:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                            color="white" if (v - lo) / max(hi - lo, 1e-12) < 0.5 else "black")
        ticks = range(0, T, max(1, T // 10))
        ax.set_xticks(list(ticks), [str(i + 1) for i in ticks])
        ax.set_yticks(list(ticks), [str(i + 1) for i in ticks])
        ax.set_xlabel("concept / task k")
        ax.set_title(method, fontsize=9)
    for row in panels:
        row[0].set_ylabel("after task t")
    better = {"max": "higher is better", "min": "lower is better"}.get(how, "")
    fig.colorbar(im, ax=list(panels.flat), shrink=0.8, label=f"{metric} ({better})" if better else metric)
    fig.suptitle(f"{benchmark}, {T} tasks: R[t][k] of {metric} (mean over seeds)", fontsize=10)
    return _save(fig, out_path, pdf)


def accuracy_curves(r_matrix_df: pd.DataFrame, out_path: Path, metric: str = "acc", pdf: bool = True) -> list[Path]:
    """Classification: mean accuracy over the tasks seen so far after each task, one line per method
    (mean over seeds ± sample std band), one panel per sequence length."""
    df = r_matrix_df[r_matrix_df["metric"] == metric]
    if df.empty:
        raise UserError(f"accuracy table has no rows for metric {metric!r}")
    benchmark = df["benchmark"].iloc[0]
    per_seed = (df[df["concept_index"] <= df["after_task"]]
                .groupby(["n_tasks", "method", "seed", "after_task"])["value"].mean().reset_index())
    stats = per_seed.groupby(["n_tasks", "method", "after_task"])["value"].agg(
        mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()
    lengths = sorted(stats["n_tasks"].unique())
    methods = list(pd.unique(df["method"]))
    colors = dict(zip(methods, matplotlib.colormaps["tab10"](np.arange(len(methods)) % 10)))
    fig = Figure(figsize=(3.6 * len(lengths) + 1.4, 3.2), layout="constrained")
    axes = fig.subplots(1, len(lengths), sharey=True, squeeze=False)[0]
    for ax, n in zip(axes, lengths):
        for method in methods:
            s = stats[(stats["n_tasks"] == n) & (stats["method"] == method)]
            if s.empty:
                continue
            x, y = s["after_task"].to_numpy(), s["mean"].to_numpy()
            ax.plot(x, y, marker="o", ms=3, color=colors[method], label=method)
            band = (s["n"] >= 2).to_numpy()
            if band.any():
                sd = s["std"].to_numpy()
                ax.fill_between(x[band], (y - sd)[band], (y + sd)[band], color=colors[method], alpha=0.15, lw=0)
        ax.set_title(f"{int(n)} tasks", fontsize=9)
        ax.set_xlabel("after task")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on seen tasks (%)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{benchmark}: accuracy over the sequence (mean over seeds)", fontsize=10)
    return _save(fig, out_path, pdf)


def tradeoff_plot(per_seed: pd.DataFrame, out_path: Path, metric: str, *, floor: float | None = None,
                  references: tuple[str, ...] = (), pdf: bool = True) -> list[Path]:
    """Learning right after each task (``P_<metric>``, x) against forgetting (``F_<metric>``, y): one point per
    method at its mean over seeds, with +- one sample std (ddof=1) bars on both axes. ``floor`` (the table's noise
    floor of ``F_<metric>``) is shaded around F = 0: a method inside it forgets nothing measurable. Methods in
    ``references`` (non-continual references, e.g. joint training) are drawn hollow.

    ``per_seed`` is the long per-seed table (method, seed, metric, value) of one (benchmark, n_tasks).
    """
    need = {"method", "seed", "metric", "value"}
    if need - set(per_seed.columns):
        raise UserError(f"trade-off plot needs columns {sorted(need)}")
    px, fy = f"P_{metric}", f"F_{metric}"
    wide = per_seed[per_seed.metric.isin([px, fy])].pivot_table(index=["method", "seed"], columns="metric",
                                                                 values="value").dropna()
    if wide.empty or not {px, fy} <= set(wide.columns):
        raise UserError(f"no {px} / {fy} values to plot")
    stats = wide.groupby(level="method").agg(["mean", "std", "count"])
    methods = [m for m in pd.unique(per_seed["method"]) if m in stats.index]
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    if floor is not None and np.isfinite(floor):
        ax.axhspan(-floor, floor, color="0.85", lw=0, label=f"noise floor of {fy} (+-{floor:.3g})")
    ax.axhline(0.0, color="0.5", lw=0.8)
    colors = matplotlib.colormaps["tab20"](np.arange(len(methods)) % 20)
    for color, m in zip(colors, methods):
        r = stats.loc[m]
        xe = r[(px, "std")] if r[(px, "count")] >= 2 else None
        ye = r[(fy, "std")] if r[(fy, "count")] >= 2 else None
        hollow = m in references
        ax.errorbar(r[(px, "mean")], r[(fy, "mean")], xerr=xe, yerr=ye, fmt="s" if hollow else "o", ms=6,
                    color=color, mfc="none" if hollow else color, capsize=2, lw=1,
                    label=f"{m} (reference)" if hollow else m)
    better = {"max": "higher is better", "min": "lower is better"}
    ax.set_xlabel(f"{px}: right after learning each concept ({better.get(direction(px), '')})")
    ax.set_ylabel(f"{fy}: forgetting ({better.get(direction(fy), '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    bench, n = per_seed["benchmark"].iloc[0], int(per_seed["n_tasks"].iloc[0])
    fig.suptitle(f"{bench}, {n} tasks: learning vs forgetting ({metric}; mean +- std over seeds)", fontsize=10)
    return _save(fig, out_path, pdf)


def lengths_plot(per_seed: pd.DataFrame, out_path: Path, metrics: tuple[str, ...], *, floors=None,
                 rows: list[tuple[str, list[str]]] | None = None, pdf: bool = True) -> list[Path]:
    """One panel per metric (e.g. ``P_oracle``, ``A_oracle``, ``F_oracle``) against the sequence length: one line per
    method through its mean over seeds, with +- one sample std (ddof=1) bars. ``floors(metric, n_tasks)`` (optional)
    gives that column's noise floor; for forgetting metrics it is shaded around 0 at each length.

    ``rows`` (optional): ``[(label, [method, ...]), ...]``, one row of panels per group of methods, so that 16 methods
    stay readable (the readings of one paper in a row of their own); every panel of a column shares its y axis, so
    the rows compare. Methods in no group, and all of them when ``rows`` is None, go in a first, unlabelled row.

    ``per_seed`` is the long per-seed table (method, n_tasks, seed, metric, value) of one benchmark.
    """
    need = {"method", "n_tasks", "seed", "metric", "value"}
    if need - set(per_seed.columns):
        raise UserError(f"sequence-length plot needs columns {sorted(need)}")
    present = [m for m in metrics if (per_seed.metric == m).any()]
    if not present:
        raise UserError(f"no values of {', '.join(metrics)} to plot")
    metrics = present
    methods = list(pd.unique(per_seed["method"]))
    grouped = [(label, [m for m in ms if m in methods]) for label, ms in (rows or [])]
    grouped = [(label, ms) for label, ms in grouped if ms]
    rest = [m for m in methods if not any(m in ms for _, ms in grouped)]
    grouped = ([("", rest)] if rest else []) + grouped
    lengths = sorted(int(n) for n in per_seed["n_tasks"].unique())
    fig = Figure(figsize=(3.6 * len(metrics) + 2.2, 3.2 * len(grouped) + 0.4), layout="constrained")
    grid = fig.subplots(len(grouped), len(metrics), squeeze=False, sharex=True, sharey="col")
    better = {"max": "higher is better", "min": "lower is better"}
    stats_of = {metric: per_seed[per_seed.metric == metric].groupby(["method", "n_tasks"])["value"]
                .agg(["mean", "std", "count"]) for metric in metrics}
    floors_of = {metric: [floors(metric, n) if floors else None for n in lengths] for metric in metrics}
    for (label, row_methods), axes in zip(grouped, grid):
        # tab10 within a row: at most 10 distinct colours side by side, reused across rows
        colors = matplotlib.colormaps["tab10" if len(row_methods) <= 10 else "tab20"](np.arange(len(row_methods)) % 20)
        for ax, metric in zip(axes, metrics):
            stats, fl = stats_of[metric], floors_of[metric]
            if metric.startswith("F") and all(f is not None and np.isfinite(f) for f in fl):
                ax.fill_between(lengths, [-f for f in fl], fl, color="0.85", lw=0, label="noise floor")
            ax.axhline(0.0, color="0.5", lw=0.8)
            for color, m in zip(colors, row_methods):
                if m not in stats.index.get_level_values(0):
                    continue
                r = stats.loc[m].reindex(lengths)
                err = r["std"].where(r["count"] >= 2)
                ax.errorbar(lengths, r["mean"], yerr=err, marker="o", ms=4, color=color, capsize=2, lw=1, label=m)
            ax.set_xticks(lengths)
            ax.set_title(f"{metric} ({better.get(direction(metric), '')})" + (f": {label}" if label else ""),
                         fontsize=9)
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        axes[-1].legend(handles, labels, fontsize=6.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in grid[-1]:
        ax.set_xlabel("tasks in the sequence")
    bench = per_seed["benchmark"].iloc[0] if "benchmark" in per_seed else ""
    fig.suptitle(f"{bench}: learning, what is left and forgetting against sequence length (mean +- std over seeds)",
                 fontsize=10)
    return _save(fig, out_path, pdf)
