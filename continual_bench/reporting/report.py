"""Regenerate a run directory's summary, tables and figures from its per-run metric files alone."""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pandas as pd

from ..evaluation.noise_floor import load_noise_floor
from ..utils import UserError, atomic_write_text
from .figures import accuracy_curves, forgetting_curves, r_matrix_heatmap, tradeoff_plot
from .reference import load_reference
from .summary import load_metrics, write_summary
from .tables import write_tables

log = logging.getLogger(__name__)


FIGURE_METRICS = ("oracle", "clip", "clip_t", "mmd")  # text-to-image R-matrix metrics with figures


def expected_runs(run_dir: str | Path) -> list[Path] | None:
    """The ``metrics.csv`` of every run the run directory's configuration asks for (``<run_dir>/config.yaml``,
    written by the workflow's run_config rule), or None when there is no such file."""
    import yaml

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{cfg_path}: unreadable ({' '.join(str(e).split())}); delete it and run snakemake again "
                        "(or pass --metrics)") from None
    out = []
    for prefix in ("", "cls_"):
        benches = cfg.get(f"{prefix}benchmarks") or []
        methods = cfg.get(f"{prefix}methods") or []
        for b in benches:
            for n in cfg.get(f"{prefix}n_tasks") or []:
                for m in methods:
                    for s in cfg.get(f"{prefix}seeds") or []:
                        out.append(Path(run_dir) / "runs" / str(b) / f"T{n}" / str(m) / f"seed{s}" / "metrics.csv")
    return out


def _missing_error(missing: list[Path], expected: int, source: str) -> UserError:
    shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return UserError(f"{len(missing)} of the {expected} runs {source} have no metrics file: {shown}; run snakemake "
                     "again to build them, or pass --allow-missing to build the tables from the runs present "
                     "(n_seeds then says how many seeds each cell has)")


def build_report(run_dir: str | Path, metric_paths: list[str | Path] | None = None,
                 reference_dir: str | Path | None = None, noise_floor_paths: list[str | Path] | None = None,
                 allow_missing: bool = False) -> list[Path]:
    """Metric files -> ``summary.csv``, ``tables/*`` and ``figures/summary/*`` under ``run_dir``.

    ``metric_paths`` are the expected runs' files: one missing is an error naming it, unless ``allow_missing``
    (then the tables hold the runs present, and their ``n_seeds`` say how many seeds each cell has). Without
    them: every ``<run_dir>/runs/**/metrics.csv``, and the runs ``<run_dir>/config.yaml`` asks for
    (:func:`expected_runs`) must be among them, with the same exception. Each run's ``R.csv`` beside
    its ``metrics.csv`` (text-to-image R[t][k], classification accuracy matrix) feeds the figures:
    forgetting curves and R-matrix heatmaps per (benchmark, n_tasks, metric), accuracy-vs-task curves
    per classification benchmark. Published numbers come from ``reference_dir`` (default
    ``results/reference``). The text-to-image benchmarks' noise floors (``noise_floor_paths``, default
    ``<run_dir>/noise_floor/*.csv``) are combined into ``noise_floor.csv`` and printed under every table.
    Nothing here touches a model: it takes seconds.
    """
    run_dir = Path(run_dir)
    if metric_paths:
        expected, source = sorted(Path(p) for p in metric_paths), "given with --metrics"
        paths = [p for p in expected if p.is_file()]
    else:
        paths = sorted(run_dir.glob("runs/**/metrics.csv"))
        expected, source = expected_runs(run_dir), f"that {run_dir / 'config.yaml'} asks for"
    missing = [p for p in (expected or []) if not p.is_file()]
    if missing:
        if not allow_missing:
            raise _missing_error(missing, len(expected), source)
        log.warning("%s; building the tables from the %d runs present (--allow-missing)",
                    _missing_error(missing, len(expected), source), len(paths))
    if not paths:
        raise UserError(f"{run_dir}: no runs/**/metrics.csv found; run the evaluation first")
    summary = write_summary(paths, run_dir / "summary.csv")
    written = [run_dir / "summary.csv"]
    floor_paths = (sorted(Path(p) for p in noise_floor_paths) if noise_floor_paths is not None
                   else sorted(run_dir.glob("noise_floor/*.csv")))
    floor = load_noise_floor(floor_paths)
    if floor is not None:
        buf = io.StringIO()
        floor.sort_values(["benchmark", "metric", "source"]).to_csv(buf, index=False, float_format="%.6g")
        atomic_write_text(run_dir / "noise_floor.csv", buf.getvalue())
        written.append(run_dir / "noise_floor.csv")
    per_seed = load_metrics(paths)  # read once: the tables' Welch test and the trade-off figures
    written += write_tables(summary, run_dir / "tables", per_seed_df=per_seed,
                            reference_df=load_reference(reference_dir), noise_floor=floor)
    figures = run_dir / "figures" / "summary"
    written += _tradeoffs(per_seed, floor, figures)
    written += _lengths(per_seed, floor, figures)
    r_paths = [p.parent / "R.csv" for p in paths if (p.parent / "R.csv").is_file()]
    if r_paths:
        from ..run_files import read_csv

        R = pd.concat([read_csv(p) for p in r_paths], ignore_index=True)
        if "track" not in R.columns:
            R["track"] = "t2i"
        for (track, bench), by_bench in R.groupby(["track", "benchmark"]):
            if track == "cls":
                written += accuracy_curves(by_bench, figures / f"accuracy_{bench}.png")
            for n, sub in by_bench.groupby("n_tasks"):
                for metric in (FIGURE_METRICS if track == "t2i" else ("acc",)):
                    if (sub[sub.concept_index > 0].metric == metric).any():
                        written += forgetting_curves(sub[sub.concept_index > 0],
                                                     figures / f"forgetting_{bench}_T{n}_{metric}.png", metric)
                        written += r_matrix_heatmap(sub, figures / f"heatmap_{bench}_T{n}_{metric}.png", metric)
    log.info("report: wrote %d files under %s", len(written), run_dir)
    return written


TRADEOFF_METRICS = {"t2i": ("oracle", "clip"), "cls": ("N",)}
LENGTHS_METRICS = ("oracle", "mmd", "clip")  # text-to-image: P_, A_ and F_ of each against the sequence length


def _lengths(per_seed: pd.DataFrame, floor, figures: Path) -> list[Path]:
    """Text-to-image benchmarks run at several sequence lengths: ``lengths_<benchmark>_<metric>.png``, P / A / F
    against the length, one line per method, the noise floor of each length's F column shaded."""
    from ..evaluation.noise_floor import floor_of_column
    from .figures import lengths_plot

    written = []
    for bench, sub in per_seed[per_seed.track == "t2i"].groupby("benchmark"):
        if sub.n_tasks.nunique() < 2:
            continue
        rows = paper_rows("t2i", list(pd.unique(sub["method"])))
        seeds_at = sub.groupby("n_tasks").apply(lambda g: int(g.groupby("method")["seed"].nunique().min()))
        for metric in LENGTHS_METRICS:
            cols = tuple(f"{agg}_{metric}" for agg in ("P", "A", "F"))
            if (sub.metric.isin(cols)).any():
                written += lengths_plot(sub, figures / f"lengths_{bench}_{metric}.png", cols, rows=rows,
                                        floors=lambda m, n, b=bench: floor_of_column(floor, b, m, n, seeds_at[n]))
    return written


def paper_rows(track: str, methods: list[str], min_size: int = 3) -> list[tuple[str, list[str]]]:
    """The methods that read one paper ``min_size`` or more ways, as ``(authors, [methods])`` groups in the order
    given; the other methods are in no group. The paper is the registry's ``paper`` up to the title (its first two
    comma-separated fields, before any " - " that names the reading: LFS-Diffusion's six readings are one group)."""
    from ..methods.registry import list_methods

    paper = {m["name"]: ",".join(m["paper"].split(",")[:2]).split(" - ")[0]
             for m in list_methods() if m["track"] == track}
    groups: dict[str, list[str]] = {}
    for m in methods:
        if m in paper:
            groups.setdefault(paper[m], []).append(m)
    # labelled by the authors and the paper's short name where its title ends in one: "Song et al. (LFS-Diffusion)"
    labelled = []
    for title, ms in groups.items():
        if len(ms) >= min_size:
            short = re.search(r"\(([^()]+)\)$", title)
            labelled.append((title.split(",")[0].strip() + (f" ({short.group(1)})" if short else ""), ms))
    return labelled


def _tradeoffs(per_seed: pd.DataFrame, floor, figures: Path) -> list[Path]:
    """Learning-vs-forgetting figures per (track, benchmark, n_tasks) and metric, the noise floor shaded and the
    non-continual references (methods that train on past data) hollow."""
    from ..evaluation.noise_floor import floor_of_column
    from ..methods.registry import list_methods

    refs = {m["name"] for m in list_methods() if m["uses_past_data"]} | {"upper_bound"}
    written = []
    for (track, bench, n), sub in per_seed.groupby(["track", "benchmark", "n_tasks"]):
        n_seeds = int(sub.groupby("method")["seed"].nunique().min())
        for metric in TRADEOFF_METRICS.get(track, ()):
            if {f"P_{metric}", f"F_{metric}"} <= set(sub.metric):
                fl = floor_of_column(floor, bench, f"F_{metric}", int(n), n_seeds)
                written += tradeoff_plot(sub, figures / f"tradeoff_{bench}_T{int(n)}_{metric}.png", metric,
                                         floor=fl, references=tuple(sorted(refs)))
    return written
