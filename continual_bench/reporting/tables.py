"""Paper tables from the seed summary: one wide CSV and one booktabs LaTeX table per
(track, benchmark, n_tasks).

Cells show ``mean ± std`` (sample std over seeds, ddof=1). The best mean per column is bold
(highest for "max" metrics, lowest for "min" metrics; see summary.direction). When the
per-seed values are given, methods whose seeds are not significantly different from the
best method's are underlined: Welch's t-test (unequal variances),

    t = (mean_a - mean_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b),

with Welch-Satterthwaite degrees of freedom, two-sided p >= 0.05, and only when both
methods have >= 2 seeds.

Noise floor (text-to-image, ``evaluation/noise_floor.py``): when a benchmark's floor is known, every method whose
mean is within the column's floor of the best mean is bold as well (a gap inside the metric's own noise is not a
finding), and the floor of each column is printed under the table and as a row of the CSV.
"""
from __future__ import annotations

import html
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from continual_bench.evaluation.noise_floor import floor_of_column
from continual_bench.reporting.summary import SUMMARY_COLUMNS, direction
from continual_bench.utils import UserError, atomic_path, atomic_write_text

PREFERRED_ORDER = {
    "t2i": ["N_train", "N_store", "P_mmd", "A_mmd", "F_mmd", "P_clip", "A_clip", "F_clip",
            "P_clip_t", "A_clip_t", "F_clip_t", "P_oracle", "A_oracle", "F_oracle", "takeover",
            "takeover_base", "takeover_generic", "Frel_mmd", "Frel_clip", "Frel_clip_t"],
    "cls": ["A_N", "F_N"],
}
ALPHA = 0.05
ARROW = {"max": r" $\uparrow$", "min": r" $\downarrow$", None: ""}
BOLD = "textbf:--rwrap;"
UNDERLINE = "underline:--rwrap;"
HTML_STYLE = {BOLD: "font-weight: bold;", UNDERLINE: "text-decoration: underline;"}
HTML_ARROW = {"max": " \u2191", "min": " \u2193", None: ""}
HTML_TABLE_STYLES = [  # booktabs-like rules; the HTML version is what `snakemake --report` shows inline
    {"selector": "", "props": "border-collapse: collapse; font-family: sans-serif; font-size: 13px;"},
    {"selector": "caption", "props": "caption-side: top; font-weight: bold; padding: 6px;"},
    {"selector": "thead", "props": "border-top: 2px solid black; border-bottom: 1px solid black;"},
    {"selector": "tbody", "props": "border-bottom: 2px solid black;"},
    {"selector": "th, td", "props": "padding: 3px 10px; text-align: center;"},
    {"selector": "th.row_heading", "props": "text-align: left;"},
]

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


def _best_methods(col: pd.Series, how: str | None, floor: float | None = None) -> list[str]:
    """Methods whose mean equals the best mean of the column (ties all count), and with a noise ``floor`` every
    method whose mean is within the floor of the best."""
    col = col.dropna()
    if how is None or col.empty:
        return []
    best = col.max() if how == "max" else col.min()
    tol = floor if floor is not None and math.isfinite(floor) else 0.0
    return [m for m, v in col.items() if np.isclose(v, best, rtol=1e-12, atol=0.0) or abs(v - best) <= tol]


def format_floor(metric: str, value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.3f}" if abs(value) < 0.1 else f"{value:.2f}"


def _floor_note(cols, metric_of, floor_of) -> str:
    """One line naming each column's noise floor (empty when none is known)."""
    parts = [f"{metric_of(c)} {format_floor(metric_of(c), f)}" for c in cols
             if floor_of is not None and (f := floor_of(c)) is not None]
    if not parts:
        return ""
    return ("Noise floor (2 sd of a gap between two cells when nothing differs; noise_floor.csv): " + ", ".join(parts)
            + ". Bold: the best mean and every mean within the floor of it.")


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


def _wide_csv(group: pd.DataFrame, methods: list[str], metrics: list[str], ref: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method: ``<metric>`` and ``<metric>_std`` columns, ``n_seeds`` (the fewest seeds behind any of the
    row's cells), ``source`` = this suite or the citation."""
    mean = group.pivot(index="method", columns="metric", values="mean").reindex(index=methods, columns=metrics)
    std = group.pivot(index="method", columns="metric", values="std").reindex(index=methods, columns=metrics)
    wide = pd.DataFrame(index=pd.Index(methods, name="method"))
    for m in metrics:
        wide[m] = mean[m]
        wide[f"{m}_std"] = std[m]
    wide["n_seeds"] = _seeds_per_method(group).reindex(methods)
    wide["source"] = "continual-bench"
    wide = wide.reset_index()
    if ref is not None and not ref.empty:
        rows = []
        for (method, source), r in ref.groupby(["method", "source"], sort=False):
            row = {"method": method, "source": f"reported: {source} ({r.benchmark.iloc[0]})"}
            for m in metrics:
                hit = r[r.metric == m]
                row[m] = float(hit["mean"].iloc[0]) if len(hit) else float("nan")
                row[f"{m}_std"] = float(hit["std"].iloc[0]) if len(hit) else float("nan")
            rows.append(row)
        wide = pd.concat([wide, pd.DataFrame(rows)], ignore_index=True)
    return wide


def _seeds_per_method(group: pd.DataFrame) -> pd.Series:
    """Per method of a summary group: the fewest seeds behind any of its cells (``n_seeds`` of summarize())."""
    return group.groupby("method", sort=False)["n_seeds"].min().astype(int)


def _seed_labels(per_method: dict[str, str]) -> dict[str, str]:
    """Row labels ``<method> (n=<seeds>)`` when the methods of a table have different seed counts, else none."""
    if len(set(per_method.values())) <= 1:
        return {}
    return {m: f"{m} (n={n})" for m, n in per_method.items()}


def _caption(benchmark: str, n_tasks, n_seeds: pd.Series) -> str:
    lo, hi = int(n_seeds.min()), int(n_seeds.max())
    seeds = f"{hi} seed{'s' if hi != 1 else ''}" if lo == hi else f"{lo}--{hi} seeds"
    tasks = f"{n_tasks} tasks" if isinstance(n_tasks, int) else "/".join(str(n) for n in n_tasks) + " tasks"
    return f"{latex_escape(benchmark)}, {tasks}, mean $\\pm$ std over {seeds}"


def _plain(latex_text: str) -> str:
    """A LaTeX caption as plain text for the HTML table."""
    return latex_text.replace("$\\pm$", "\u00b1").replace("--", "\u2013").replace("\\_", "_").replace("\\&", "&")


def _styled_tables(mean: pd.DataFrame, std: pd.DataFrame, metric_of, seeds_of, ref_cells: pd.DataFrame | None,
                  *, caption: str, label: str, header: str, floor_of=None, labels=None) -> tuple[str, str]:
    """Booktabs LaTeX and an HTML twin of a methods x columns table through pandas Styler.

    ``mean``/``std``: methods x column keys; ``metric_of(col)`` names a column's metric (for its format and
    direction); ``seeds_of(col)`` gives the per-seed long table of that column (Welch) or None.
    ``ref_cells``: already formatted reported rows, printed below a rule and never highlighted.
    ``floor_of(col)``: the column's noise floor or None; means within it of the best are bold too.
    ``labels``: row labels of methods (e.g. with their seed counts when those differ).
    """
    methods, cols = list(mean.index), list(mean.columns)
    cells = pd.DataFrame({c: [format_cell(metric_of(c), mean.at[r, c], std.at[r, c]) for r in methods] for c in cols},
                         index=methods)
    css = pd.DataFrame("", index=methods, columns=cols)
    for c in cols:
        m = metric_of(c)
        top = _best_methods(mean[c], direction(m))
        best = _best_methods(mean[c], direction(m), floor_of(c) if floor_of else None)
        for b in best:
            css.at[b, c] = BOLD
        if len(top) == 1:
            others = [r for r in methods if r not in best and math.isfinite(mean.at[r, c])]
            for r in _not_significant(seeds_of(c), m, top[0], others):
                css.at[r, c] = UNDERLINE
    n_own = len(cells)
    if labels:
        cells.index = css.index = [labels.get(m, m) for m in methods]
    if ref_cells is not None and not ref_cells.empty:
        cells = pd.concat([cells, ref_cells[cols]])
        css = pd.concat([css, pd.DataFrame("", index=ref_cells.index, columns=cols)])

    def head(c, html=False):
        m = metric_of(c)
        name = m + HTML_ARROW[direction(m)] if html else latex_escape(m) + ARROW[direction(m)]
        return (f"{c[0]} tasks", name) if isinstance(c, tuple) else name

    multi = isinstance(cols[0], tuple)

    def columns(html):
        heads = [head(c, html) for c in cols]
        return pd.MultiIndex.from_tuples(heads) if multi else pd.Index(heads)

    html_cells, html_css = cells.map(lambda v: _plain(v) if isinstance(v, str) else v), css.replace(HTML_STYLE)
    html_cells.columns = html_css.columns = columns(True)
    html_cells.columns.names = [None, "Method"] if multi else ["Method"]
    html_styler = (html_cells.style.apply(lambda _: html_css.values, axis=None).format_index(escape="html", axis=0)
                   .set_caption(_plain(caption))
                   .set_uuid(re.sub(r"\W", "_", label))  # a fixed id: regenerated tables are byte-identical
                   .set_table_styles(HTML_TABLE_STYLES))
    if len(html_cells) > n_own:  # a rule above the reported rows
        html_styler = html_styler.set_table_styles(
            {html_cells.index[n_own]: [{"selector": sel, "props": "border-top: 1px solid black;"} for sel in ("th", "td")]},
            axis=1, overwrite=False)
    notes = "".join(f"<p>{html.escape(line.lstrip('% '))}</p>" for line in header.splitlines())
    floor_note = _floor_note(cols, metric_of, floor_of)
    html_out = notes + html_styler.to_html(exclude_styles=False) + (f"<p>{html.escape(floor_note)}</p>\n" if floor_note else "")
    cells.columns = css.columns = columns(False)
    cells.columns.names = [None, "Method"] if multi else ["Method"]
    styler = cells.style.apply(lambda _: css.values, axis=None)
    styler = styler.format_index(escape="latex", axis=0)
    tex = styler.to_latex(hrules=True, column_format="l" + "c" * len(cols), caption=caption, label=label,
                          position_float="centering", multicol_align="c")
    if len(cells) > n_own:  # a rule between this suite's rows and the reported ones
        lines = tex.splitlines()
        first_ref = latex_escape(str(cells.index[n_own]))
        i = next(i for i, ln in enumerate(lines) if ln.startswith(first_ref))
        lines.insert(i, r"\midrule")
        tex = "\n".join(lines) + "\n"
    if floor_note:  # under the table, inside its float
        tex = tex.replace("\\end{table}", "\\par\\footnotesize " + latex_escape(floor_note) + "\n\\end{table}")
    return header + tex, html_out


def _write_tex_html(out_dir: Path, stem: str, tex: str, html_table: str) -> list[Path]:
    paths = [out_dir / f"{stem}.tex", out_dir / f"{stem}.html"]
    for path, text in zip(paths, (tex, html_table)):
        atomic_write_text(path, text)
    return paths


def _header(track: str, what: str, per_seed: bool, ref: pd.DataFrame | None) -> str:
    header = f"% {track} / {what}: bold = best mean per column (arrow: better direction).\n"
    if per_seed:
        header += ("% Underlined: not significantly different from the bold method "
                   f"(Welch's t-test, two-sided p >= {ALPHA}, both methods with >= 2 seeds).\n")
    if ref is not None and not ref.empty:
        for source, r in ref.groupby("source"):
            header += f"% Rows below the rule are reported by {source} on {', '.join(sorted(set(r.benchmark)))}, not run here.\n"
    return header


def _ref_cells(ref: pd.DataFrame | None, cols, metric_of, ntasks_of, benchmark: str) -> pd.DataFrame | None:
    """Reported rows, formatted: label ``<method> (reported)`` or ``(reported, <dataset>)`` for mirrors."""
    if ref is None or ref.empty:
        return None
    out = {}
    for method, r in ref.groupby("method", sort=False):
        where = "" if set(r.benchmark) == {benchmark} else f", {r.benchmark.iloc[0]}"
        row = {}
        for c in cols:
            hit = r[(r.metric == metric_of(c)) & (r.n_tasks == ntasks_of(c))]
            row[c] = (format_cell(metric_of(c), float(hit["mean"].iloc[0]), float(hit["std"].iloc[0]))
                      if len(hit) else "--")
        out[f"{method} (reported{where})"] = row
    return pd.DataFrame.from_dict(out, orient="index")


def write_tables(summary_df: pd.DataFrame, out_dir: Path, per_seed_df: pd.DataFrame | None = None,
                 reference_df: pd.DataFrame | None = None, noise_floor: pd.DataFrame | None = None) -> list[Path]:
    """Write ``<benchmark>_T<n_tasks>.csv`` and ``.tex`` per (track, benchmark, n_tasks) into ``out_dir``,
    and for the classification track ``<benchmark>_combined.csv/.tex`` with the sequence lengths side by side.

    ``summary_df`` is the output of summarize(); ``per_seed_df`` (optional) is the long per-seed
    table from load_metrics(), used for the Welch underlining; ``reference_df`` (optional, see
    reference.load_reference) adds published numbers as a separate block of rows; ``noise_floor``
    (optional, evaluation.noise_floor) widens bold to every mean within the column's floor. If one
    (benchmark, n_tasks) occurs in several tracks, file names get a ``<track>_`` prefix.
    """
    from .reference import reference_for

    missing = [c for c in SUMMARY_COLUMNS if c not in summary_df.columns]
    if missing:
        raise UserError(f"summary table lacks column(s) {', '.join(missing)}")
    out_dir = Path(out_dir)
    tracks_per_bench = summary_df.groupby(["benchmark", "n_tasks"])["track"].nunique()
    written: list[Path] = []

    def seeds(track, benchmark, n_tasks):
        if per_seed_df is None:
            return None
        sel = ((per_seed_df["track"] == track) & (per_seed_df["benchmark"] == benchmark)
               & (per_seed_df["n_tasks"] == n_tasks))
        return per_seed_df[sel]

    for (track, benchmark, n_tasks), group in summary_df.groupby(["track", "benchmark", "n_tasks"], sort=True):
        if not _SAFE_NAME.match(str(benchmark)):
            raise UserError(f"benchmark name {benchmark!r} is not usable in a file name")
        n_tasks = int(n_tasks)
        methods = list(pd.unique(group["method"]))
        metrics = order_metrics(group["metric"], track)
        stem = f"{benchmark}_T{n_tasks}"
        if tracks_per_bench[(benchmark, n_tasks)] > 1:
            stem = f"{track}_{stem}"
        per_seed = seeds(track, benchmark, n_tasks)
        ref = reference_for(reference_df, track, benchmark, n_tasks)
        ref = ref[ref.metric.isin(metrics)]
        mean = group.pivot(index="method", columns="metric", values="mean").reindex(index=methods, columns=metrics)
        std = group.pivot(index="method", columns="metric", values="std").reindex(index=methods, columns=metrics)
        n_seeds = int(group["n_seeds"].min())

        def floor_of(col, benchmark=benchmark, n_tasks=n_tasks, n_seeds=n_seeds):
            return floor_of_column(noise_floor, benchmark, col, n_tasks, n_seeds)

        csv_path = out_dir / f"{stem}.csv"
        wide = _wide_csv(group, methods, metrics, ref)
        floors = {m: floor_of(m) for m in metrics}
        if any(v is not None for v in floors.values()):
            row = {"method": "noise floor", "source": "noise_floor.csv: 2 sd of a gap between two cells when nothing differs"}
            row.update({m: v for m, v in floors.items() if v is not None})
            wide = pd.concat([wide, pd.DataFrame([row])], ignore_index=True)
        with atomic_path(csv_path) as tmp:
            wide.to_csv(tmp, index=False)
        tex, html_table = _styled_tables(mean, std, lambda c: c, lambda c: per_seed,
                            _ref_cells(ref, metrics, lambda c: c, lambda c: n_tasks, benchmark),
                            caption=_caption(benchmark, n_tasks, group["n_seeds"]),
                            label=f"tab:{benchmark}_T{n_tasks}",
                            header=_header(track, f"{benchmark} / T={n_tasks}", per_seed is not None, ref),
                            floor_of=floor_of,
                            labels=_seed_labels({m: str(n) for m, n in _seeds_per_method(group).items()}))
        written += [csv_path, *_write_tex_html(out_dir, stem, tex, html_table)]

    for (track, benchmark), group in summary_df.groupby(["track", "benchmark"], sort=True):
        if track == "cls" or group.n_tasks.nunique() > 1:  # text-to-image: only where several lengths ran
            written += _write_combined(group, track, benchmark, out_dir, seeds,
                                       reference_for(reference_df, track, benchmark), noise_floor)
    return written


# the sequence lengths side by side: classification as CODA-Prompt's table; text-to-image learning, what is left at
# the end and forgetting by the oracle, and forgetting by KID
COMBINED_METRICS = {"cls": ["A_N", "F_N"], "t2i": ["P_oracle", "A_oracle", "F_oracle", "F_mmd"]}


def _write_combined(group: pd.DataFrame, track: str, benchmark: str, out_dir: Path, seeds, ref: pd.DataFrame,
                    noise_floor: pd.DataFrame | None = None) -> list[Path]:
    """The track's :data:`COMBINED_METRICS` for every sequence length side by side (``<benchmark>_combined``)."""
    from ..evaluation.noise_floor import floor_of_column

    lengths = sorted(int(n) for n in group.n_tasks.unique())
    metrics = [m for m in COMBINED_METRICS[track] if m in set(group.metric)]
    if not metrics:
        return []
    methods = list(pd.unique(group["method"]))
    cols = [(n, m) for n in lengths for m in metrics]
    mean = pd.DataFrame(index=methods, columns=pd.Index(cols, tupleize_cols=False), dtype=float)
    std = mean.copy()
    for r in group[group.metric.isin(metrics)].itertuples():
        mean.at[r.method, (int(r.n_tasks), r.metric)] = r.mean
        std.at[r.method, (int(r.n_tasks), r.metric)] = r.std
    flat = pd.DataFrame({"method": methods})
    for n, m in cols:
        flat[f"{m}_T{n}"] = mean[(n, m)].to_numpy()
        flat[f"{m}_T{n}_std"] = std[(n, m)].to_numpy()
    sub = group[group.metric.isin(metrics)]
    seed_counts = {n: _seeds_per_method(sub[sub.n_tasks == n]).reindex(methods) for n in lengths}
    for n in lengths:
        flat[f"n_seeds_T{n}"] = seed_counts[n].to_numpy()
    flat["source"] = "continual-bench"
    ref = ref[ref.metric.isin(metrics) & ref.n_tasks.isin(lengths)]
    if not ref.empty:
        rows = []
        for (method, source), r in ref.groupby(["method", "source"], sort=False):
            row = {"method": method, "source": f"reported: {source} ({r.benchmark.iloc[0]})"}
            for n, m in cols:
                hit = r[(r.metric == m) & (r.n_tasks == n)]
                row[f"{m}_T{n}"] = float(hit["mean"].iloc[0]) if len(hit) else float("nan")
                row[f"{m}_T{n}_std"] = float(hit["std"].iloc[0]) if len(hit) else float("nan")
            rows.append(row)
        flat = pd.concat([flat, pd.DataFrame(rows)], ignore_index=True)
    csv_path = out_dir / f"{benchmark}_combined.csv"
    with atomic_path(csv_path) as tmp:
        flat.to_csv(tmp, index=False)
    n_seeds = group["n_seeds"]

    def floor_of(col):  # the floor of that length's column, for the fewest seeds any method has there
        n_at = group[group.n_tasks == col[0]]["n_seeds"]
        return floor_of_column(noise_floor, benchmark, col[1], col[0], int(n_at.min())) if len(n_at) else None

    tex, html_table = _styled_tables(mean, std, lambda c: c[1], lambda c: seeds(track, benchmark, c[0]),
                        _ref_cells(ref, cols, lambda c: c[1], lambda c: c[0], benchmark),
                        caption=_caption(benchmark, lengths, n_seeds), label=f"tab:{benchmark}_combined",
                        header=_header(track, f"{benchmark} / T={lengths}", seeds(track, benchmark, lengths[0]) is not None, ref),
                        floor_of=floor_of,
                        labels=_seed_labels({m: "/".join("-" if pd.isna(seed_counts[n][m]) else str(int(seed_counts[n][m]))
                                                         for n in lengths) for m in methods}))
    return [csv_path, *_write_tex_html(out_dir, f"{benchmark}_combined", tex, html_table)]
