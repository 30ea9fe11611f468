"""Published numbers as reference rows: ``results/reference/*.csv``, each row citing its source.

Columns ``track,benchmark,n_tasks,method,metric,mean,std,source``. Tables print them in a separate block,
marked as reported, for the benchmark itself and for toy benchmarks that mirror it (``Benchmark.mirrors``);
they never enter the bold/underline comparison, which is about this suite's own runs.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..utils import UserError

REFERENCE_COLUMNS = ["track", "benchmark", "n_tasks", "method", "metric", "mean", "std", "source"]
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"


def load_reference(ref_dir: str | Path | None = None) -> pd.DataFrame:
    """All reference CSVs of ``ref_dir`` (default: the repository's ``results/reference``), or an empty frame."""
    ref_dir = Path(ref_dir) if ref_dir else DEFAULT_DIR
    frames = []
    for path in sorted(ref_dir.glob("*.csv")) if ref_dir.is_dir() else []:
        df = pd.read_csv(path)
        missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
        if missing:
            raise UserError(f"{path}: reference table lacks column(s) {', '.join(missing)}")
        if df["source"].isna().any() or (df["source"].astype(str).str.strip() == "").any():
            raise UserError(f"{path}: every reference row needs its source (column 'source')")
        frames.append(df[REFERENCE_COLUMNS])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REFERENCE_COLUMNS)


def reference_for(reference: pd.DataFrame | None, track: str, benchmark: str, n_tasks: int | None = None) -> pd.DataFrame:
    """Reference rows for ``benchmark`` or the real dataset it mirrors (toy benchmarks)."""
    if reference is None or reference.empty:
        return pd.DataFrame(columns=REFERENCE_COLUMNS)
    from ..data.benchmarks import BENCHMARKS

    names = {benchmark}
    if benchmark in BENCHMARKS and BENCHMARKS[benchmark].mirrors:
        names.add(BENCHMARKS[benchmark].mirrors)
    sel = (reference.track == track) & reference.benchmark.isin(names)
    if n_tasks is not None:
        sel &= reference.n_tasks == n_tasks
    return reference[sel]
