"""Did a rerun reproduce a result folder? Every cell of two ``summary.csv`` files, side by side.

A cell is (track, benchmark, n_tasks, method, metric) with its mean and sample std over ``n`` seeds. For a cell in
both folders, with ``d = mean_run - mean_ref``:

* ``d / sd_ref``: the difference in units of the reference's seed std (how many "seeds" apart);
* ``d / floor``: in units of the metric's noise floor for that cell: text-to-image columns from the folders'
  ``noise_floor.csv`` (``evaluation/noise_floor.py``); classification accuracies (``A_N``, ``F_N``, ``F_avl``,
  ``P_N``) from the runs' own test sets, ``2 * sqrt(s_run^2 + s_ref^2)`` with ``s`` a folder's test-set sampling sd
  of its seed mean (:func:`continual_bench.evaluation.cls_metrics.sampling_sd` of each seed's run,
  ``sqrt(sum s_seed^2) / n_seeds``): two standard deviations of the gap between two cells that differ only by the
  draw of the test images. Each folder's runs give theirs from ``predictions.npz`` where present (a fresh run),
  else from ``acc_matrix.csv`` (a committed folder); a folder without run files borrows the other's;
* the verdict: ``identical`` when the means are equal (to 1e-9 relative), ``within noise`` when
  ``|d| <= 2 * sqrt(sd_run^2 / n_run + sd_ref^2 / n_ref)`` (two standard errors of the difference of two seed means)
  or ``|d|`` is inside the cell's floor, else ``differs``; a cell in only one folder is ``missing``. Parameter
  counts (``N_*``) are deterministic: they are identical or they differ.

``compare`` exits with status 1 when any cell differs or is missing, so a script can rely on it.

Before the cells it says whether the two folders' runs used the same models: the ``weights`` column of their
``runs/**/metrics.csv`` rows (:func:`continual_bench.utils.weights_fingerprint` of the backbone, judge and oracle).
The same weights, packages and CPU give identical cells; the toy world pretrained on another CPU gives other weights,
and then ``within noise`` is what a reproduction can reach. Rows written before the column existed (2026-12-02)
leave it unknown.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd

from ..evaluation.noise_floor import floor_of_column, load_noise_floor
from ..utils import UserError

KEYS = ["track", "benchmark", "n_tasks", "method", "metric"]
VERDICTS = ("identical", "within noise", "differs", "missing")


def _summary(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "summary.csv"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: unreadable summary ({e}); run `continual-bench tables {run_dir}` first") from None
    missing = [c for c in KEYS + ["mean", "std", "n_seeds"] if c not in df.columns]
    if missing:
        raise UserError(f"{path}: lacks column(s) {missing}")
    return df


def _verdict(metric: str, d: float, se: float, floor: float | None, ref_mean: float) -> str:
    if math.isclose(d, 0.0, abs_tol=1e-9 * max(1.0, abs(ref_mean))):
        return "identical"
    if metric.startswith("N_"):
        return "differs"
    if (math.isfinite(se) and abs(d) <= 2 * se) or (floor is not None and abs(d) <= floor):
        return "within noise"
    return "differs"


def _cls_sd(folder: Path, benchmark: str, n_tasks: int, method: str, metric: str) -> float | None:
    """A folder's test-set sampling sd of one classification cell's seed mean (module docstring), or None."""
    from ..evaluation.cls_metrics import run_sampling_sd

    sds = []
    for path in sorted((folder / "runs" / str(benchmark) / f"T{int(n_tasks)}" / str(method)).glob("*/acc_matrix.csv")):
        sd = run_sampling_sd(path.parent)[0].get(metric)
        if sd is None:
            return None
        sds.append(sd)
    return math.sqrt(sum(v * v for v in sds)) / len(sds) if sds else None


def _cls_floor(run_dir: Path, ref_dir: Path, cell: dict) -> float | None:
    if cell["track"] != "cls" or cell["metric"] not in ("A_N", "F_N", "F_avl", "P_N"):
        return None
    key = (cell["benchmark"], cell["n_tasks"], cell["method"], cell["metric"])
    run, ref = _cls_sd(run_dir, *key), _cls_sd(ref_dir, *key)
    if run is None and ref is None:
        return None
    run, ref = (ref if run is None else run), (run if ref is None else ref)
    return 2 * math.sqrt(run ** 2 + ref ** 2)


def compare_runs(run_dir: str | Path, ref_dir: str | Path) -> pd.DataFrame:
    """One row per cell: both means and stds, ``d``, ``d_over_sd`` (reference seed std), ``d_over_floor``, verdict."""
    run, ref = _summary(Path(run_dir)), _summary(Path(ref_dir))
    floor = load_noise_floor(sorted(Path(ref_dir).glob("noise_floor.csv")) or sorted(Path(run_dir).glob("noise_floor.csv")))
    both = run.merge(ref, on=KEYS, how="outer", suffixes=("_run", "_ref"), indicator="side")
    rows = []
    for r in both.itertuples(index=False):
        cell = {k: getattr(r, k) for k in KEYS}
        if r.side != "both":
            rows.append({**cell, "verdict": "missing", "where": "only in run" if r.side == "left_only"
                         else "only in reference"})
            continue
        d = float(r.mean_run) - float(r.mean_ref)
        n_run, n_ref = max(int(r.n_seeds_run), 1), max(int(r.n_seeds_ref), 1)
        sd_run = float(r.std_run) if math.isfinite(float(r.std_run)) else 0.0
        sd_ref = float(r.std_ref) if math.isfinite(float(r.std_ref)) else 0.0
        se = math.sqrt(sd_run ** 2 / n_run + sd_ref ** 2 / n_ref)
        fl = floor_of_column(floor, r.benchmark, r.metric, int(r.n_tasks), min(n_run, n_ref))
        if fl is None:
            fl = _cls_floor(Path(run_dir), Path(ref_dir), cell)
        rows.append({**cell, "mean_run": float(r.mean_run), "mean_ref": float(r.mean_ref), "std_ref": sd_ref, "d": d,
                     "d_over_sd": d / sd_ref if sd_ref > 0 else (0.0 if d == 0 else math.inf),
                     "floor": fl if fl else math.nan, "d_over_floor": d / fl if fl else math.nan,
                     "verdict": _verdict(r.metric, d, se, fl, float(r.mean_ref)), "where": "both"})
    out = pd.DataFrame(rows)
    return out.sort_values(KEYS, kind="stable").reset_index(drop=True)


def run_weights(run_dir: str | Path) -> dict[str, int]:
    """The ``weights`` values of a result folder's runs (``runs/**/metrics.csv``, first row of each) -> how many runs
    carry each; runs whose rows lack the column count under ``unknown``."""
    out: dict[str, int] = {}
    for path in sorted(Path(run_dir).glob("runs/**/metrics.csv")):
        try:
            with open(path, newline="") as f:
                row = next(csv.DictReader(f), None) or {}
        except (OSError, UnicodeDecodeError, csv.Error):
            row = {}
        value = row.get("weights") or "unknown"
        out[value] = out.get(value, 0) + 1
    return out


def weights_note(run_dir: str | Path, ref_dir: str | Path) -> str:
    """One line: did the two folders' runs use the same model weights (see the module docstring)?"""
    run, ref = run_weights(run_dir), run_weights(ref_dir)
    if not run or not ref:
        return "model weights: no runs/**/metrics.csv in " + (str(run_dir) if not run else str(ref_dir))

    def show(w: dict[str, int]) -> str:
        return "; ".join(f"{v} ({n} runs)" for v, n in sorted(w.items()))

    if "unknown" in run or "unknown" in ref:
        return (f"model weights: not recorded for every run (run folder: {show(run)}; reference: {show(ref)}), "
                "so whether both used the same models is unknown")
    if set(run) <= set(ref) or set(ref) <= set(run):  # one folder may hold fewer benchmarks (oracles) than the other
        return (f"model weights: the same in both folders (run folder: {show(run)}; reference: {show(ref)}); with the "
                "same packages and CPU every cell should be identical")
    return (f"model weights differ (run folder: {show(run)}; reference: {show(ref)}): cells cannot be expected to be "
            "identical, 'within noise' is what a reproduction can reach")


def format_comparison(df: pd.DataFrame) -> str:
    """A short report: counts per verdict, then every cell that is not identical."""
    counts = df["verdict"].value_counts()
    head = ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
    lines = [f"{len(df)} cells: {head}"]
    for r in df[df.verdict != "identical"].itertuples(index=False):
        where = f"{r.track}/{r.benchmark}/T{r.n_tasks}/{r.method}/{r.metric}"
        if r.verdict == "missing":
            lines.append(f"  missing       {where} ({r.where})")
            continue
        fl = "" if not math.isfinite(r.d_over_floor) else f", {r.d_over_floor:+.2f} floors of {r.floor:.3g}"
        sd = f"{r.d_over_sd:+.2f} seed sd" if math.isfinite(r.d_over_sd) else "no seed sd in the reference"
        lines.append(f"  {r.verdict:13s} {where}: {r.mean_run:.6g} vs {r.mean_ref:.6g} (d {r.d:+.4g} = {sd}{fl})")
    return "\n".join(lines)
