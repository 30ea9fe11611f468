"""Where a DAG run's time went: Snakemake's benchmark files, per job, per step and per method.

Every rule of the workflow names a ``benchmark:`` file (``workflow/rules/*.smk``). Snakemake writes it when the
job ends, one row per attempt kept (the latest): ``s`` (wall seconds), ``cpu_time`` (CPU seconds of the job's
process tree), ``max_rss`` (its peak resident memory, MB) and more. Wall time is exact; the other two are sampled
(Snakemake polls the process tree every 0.5 s for the first ~15 s, then every 30 s), so for long jobs they are lower
bounds. The files sit beside the logs, which git ignores:

* a run's jobs: ``RUN_DIR/runs/<benchmark>/T<n>/<method>/seed<s>/logs/{train,generate,evaluate,train_cls}.tsv``;
* the result folder's own: ``RUN_DIR/logs/{tables,noise_floor_<benchmark>}.tsv``;
* the models and data every result folder shares: ``logs/toy/*.tsv`` (the toy world), ``logs/paper/*.tsv``
  (fetching and preparing the paper profile's data and weights).

:func:`profile` sums them. ``work`` is the wall time of all jobs together; on ``c`` cores (or GPUs) no schedule
finishes in less than ``max(work / c, longest job)``, so the ratio of a run's elapsed time to that bound says how
much a better schedule could still save, and ``work`` itself is what cutting compute would have to shrink. In the
paper profile each run job holds one GPU (``resources: gpu=1``), so the per-method wall hours are its GPU-hours,
measured rather than projected.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pandas as pd

from ..utils import UserError

RUN_STEP = re.compile(r"runs/(?P<benchmark>[^/]+)/T(?P<n_tasks>\d+)/(?P<method>[^/]+)/seed(?P<seed>\d+)/logs/"
                      r"(?P<step>[^/]+)\.tsv$")
COLUMNS = ["job", "step", "benchmark", "n_tasks", "method", "seed", "s", "cpu_time", "max_rss"]


def benchmark_files(run_dir: str | Path, shared: list[str | Path] = ("logs/toy", "logs/paper")) -> list[Path]:
    """A result folder's benchmark files (its runs' and its own), then those of the shared folders that exist."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("runs/*/T*/*/seed*/logs/*.tsv")) + sorted(run_dir.glob("logs/*.tsv"))
    for folder in shared:
        files += sorted(Path(folder).glob("*.tsv"))
    return files


def _step(path: Path, run_dir: Path) -> dict:
    rel = path.as_posix()
    m = RUN_STEP.search(rel)
    if m:
        return {"step": m["step"], "benchmark": m["benchmark"], "n_tasks": int(m["n_tasks"]), "method": m["method"],
                "seed": int(m["seed"])}
    stem = path.stem
    if path.parent == run_dir / "logs":
        return {"step": "noise_floor" if stem.startswith("noise_floor_") else stem}
    return {"step": f"{path.parent.name}/{stem}"}  # shared: toy/vae, toy/data_toy_faces, paper/fetch_model_sd15


def read_benchmarks(paths, run_dir: str | Path) -> pd.DataFrame:
    """One row per benchmark file (its last row: the latest attempt): :data:`COLUMNS`."""
    run_dir = Path(run_dir)
    rows = []
    for path in paths:
        path = Path(path)
        try:
            df = pd.read_csv(path, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise UserError(f"{path}: unreadable benchmark file ({e})") from None
        missing = [c for c in ("s", "cpu_time", "max_rss") if c not in df.columns]
        if missing or df.empty:
            raise UserError(f"{path}: not a Snakemake benchmark file (no rows or no column {missing})")
        last = df.iloc[-1]
        # Snakemake writes "NA" where it could not measure (a job shorter than its sampling interval)
        rows.append({"job": str(path), **_step(path, run_dir), "s": float(last["s"]),
                     "cpu_time": pd.to_numeric(last["cpu_time"], errors="coerce"),
                     "max_rss": pd.to_numeric(last["max_rss"], errors="coerce")})
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def profile(jobs: pd.DataFrame, cores: int) -> dict:
    """Per step and per method sums, and the bound on the elapsed time on ``cores`` (module docstring)."""
    if jobs.empty:
        raise UserError("no benchmark files: run the DAG first (every rule writes one beside its log)")
    if cores < 1:
        raise UserError(f"--cores {cores}: must be >= 1")
    agg = dict(jobs=("s", "size"), wall_s=("s", "sum"), longest_s=("s", "max"), cpu_s=("cpu_time", "sum"),
               peak_rss_mb=("max_rss", "max"))
    steps = jobs.groupby("step", sort=False).agg(**agg).sort_values("wall_s", ascending=False)
    runs = jobs.dropna(subset=["method"])
    methods = (runs.groupby(["benchmark", "n_tasks", "method"]).agg(**agg).sort_values("wall_s", ascending=False)
               if not runs.empty else pd.DataFrame())
    work, longest = float(jobs["s"].sum()), float(jobs["s"].max())
    return {"steps": steps, "methods": methods, "work_s": work, "longest_s": longest, "cores": cores,
            "bound_s": max(work / cores, longest)}


def _table(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_string(buf, float_format=lambda v: "-" if math.isnan(v) else f"{v:,.0f}")
    return buf.getvalue()


def format_profile(p: dict, elapsed_s: float | None = None) -> str:
    lines = [f"{int(p['steps']['jobs'].sum())} jobs, {p['work_s']:,.0f} s of work (longest job {p['longest_s']:,.0f} s): "
             f"on {p['cores']} cores no schedule takes less than {p['bound_s']:,.0f} s"]
    if elapsed_s:
        lines[0] += f"; elapsed {elapsed_s:,.0f} s = {100 * p['bound_s'] / elapsed_s:.0f} % efficient"
    lines += ["", "per step (wall and CPU seconds summed over jobs, peak memory in MB):", _table(p["steps"])]
    if not p["methods"].empty:
        lines += ["", "per method (its runs' jobs):", _table(p["methods"])]
    return "\n".join(lines)
