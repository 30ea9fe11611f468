"""Regenerate a run directory's summary, tables and figures from its per-run metric files alone."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..utils import UserError
from .figures import forgetting_curves
from .summary import load_metrics, write_summary
from .tables import write_tables

log = logging.getLogger(__name__)


def build_report(run_dir: str | Path, metric_paths: list[str | Path] | None = None) -> list[Path]:
    """Metric files -> ``summary.csv``, ``tables/*``, ``figures/forgetting_*`` under ``run_dir``.

    ``metric_paths`` defaults to every ``<run_dir>/runs/**/metrics.csv``; each run's ``R.csv`` beside
    its ``metrics.csv`` feeds the forgetting curves.
    """
    run_dir = Path(run_dir)
    paths = sorted(Path(p) for p in metric_paths) if metric_paths else sorted(run_dir.glob("runs/**/metrics.csv"))
    if not paths:
        raise UserError(f"{run_dir}: no runs/**/metrics.csv found; run the evaluation first")
    summary = write_summary(paths, run_dir / "summary.csv")
    written = [run_dir / "summary.csv"]
    written += write_tables(summary, run_dir / "tables", per_seed_df=load_metrics(paths))
    r_paths = [p.parent / "R.csv" for p in paths if (p.parent / "R.csv").is_file()]
    if r_paths:
        R = pd.concat([pd.read_csv(p) for p in r_paths], ignore_index=True)
        for (bench, n), sub in R.groupby(["benchmark", "n_tasks"]):
            for metric in ("oracle", "clip", "mmd"):
                if (sub.metric == metric).any():
                    written += forgetting_curves(sub, run_dir / "figures" / f"forgetting_{bench}_T{n}_{metric}.png",
                                                 metric)
    log.info("report: wrote %d files under %s", len(written), run_dir)
    return written
