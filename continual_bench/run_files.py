"""Reading a run's files: a missing, truncated or corrupt file is a one-line error naming it and the repair.

A run folder (``results/<run>/runs/<benchmark>/T<n>/<method>/seed<s>/``) holds ``train.json``, ``samples.npz``,
``metrics.csv``, ``R.csv`` (and ``acc_matrix.csv`` for classification) and ``checkpoints/<fingerprint>/task_<t>/``
with ``state.safetensors`` and ``meta.json``. Each task's ``meta.json`` records the sha256 of its state file
(``state_sha256``); training verifies it before trusting a finished task, and every load checks it again.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

from .utils import UserError, file_sha256

STATE = "state.safetensors"
META = "meta.json"
_WHY = {
    "train.json": "training resumes from its checkpoints",
    "samples.npz": "the run's samples are generated again",
    "predictions.npz": "train-cls writes it again from the checkpoints' meta.json",
    "metrics.csv": "the run is evaluated again",
    "R.csv": "the run is evaluated again",
    "acc_matrix.csv": "the run is trained and evaluated again from its checkpoints",
}


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder of a file inside it (or inside its checkpoints/), if the layout says so."""
    path = Path(path)
    for parent in path.parents:
        if parent.name == "checkpoints":
            return parent.parent
    return path.parent if path.name in _WHY else None


def repair_hint(path: str | Path) -> str:
    """How to rebuild ``path``: for a run's outputs, delete and rerun; for a checkpoint, rerun the training."""
    path = Path(path)
    if path.name in _WHY:
        return f"repair: delete {path} and run snakemake again ({_WHY[path.name]})"
    run = run_dir_of(path)
    if run is not None:
        return (f"repair: delete {run / 'train.json'} and run snakemake again (training checks every checkpoint "
                f"and retrains a corrupt task from the one before)")
    if path.name in (STATE, META):
        return "repair: run the train step again (it checks every checkpoint and retrains a corrupt task)"
    return f"repair: delete {path} and run the step that wrote it again"


NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def file_error(path, what: str, detail: BaseException | str) -> UserError:
    """A UserError ``<path>: <what> (<detail>); repair: ...`` (one line)."""
    if isinstance(detail, BaseException):
        detail = f"{type(detail).__name__}: {detail}" if str(detail) else type(detail).__name__
    detail = " ".join(str(detail).split())
    return UserError(f"{path}: {what} ({detail}); {repair_hint(path)}")


def read_json(path: str | Path) -> dict:
    """A run's JSON file (train.json, meta.json), or a UserError naming it and the repair."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise file_error(path, "missing", e) from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise file_error(path, "unreadable or truncated JSON", e) from None


def load_npz(path: str | Path) -> dict:
    """Every array of a ``.npz`` file (read now, so a truncated member fails here), or a UserError naming it."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError as e:
        raise file_error(path, "missing", e) from None
    except NPZ_ERRORS as e:
        raise file_error(path, "unreadable or truncated samples file", e) from None


def read_csv(path: str | Path, **kwargs):
    """A run's CSV file (R.csv, ...), or a UserError naming it."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError as e:
        raise file_error(path, "missing", e) from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise file_error(path, "unreadable CSV", e) from None


def state_problem(path: str | Path, sha256: str | None) -> str | None:
    """Why the checkpoint ``path`` cannot be trusted (missing, sha256 mismatch, truncated), or None.

    With ``sha256`` (recorded in the task's meta.json) the file must hash to it; without (checkpoints written
    before the hash was recorded) its safetensors header must parse and its size must match what the header
    describes, which catches truncation."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if sha256:
        actual = file_sha256(path)
        return None if actual == sha256 else f"sha256 {actual} differs from {sha256} recorded in {META}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"invalid header length {n} for a file of {size} bytes"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return None if 8 + n + end == size else f"{size} bytes, the header describes {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"


def load_state(path: str | Path, sha256: str | None = None, device: str = "cpu") -> dict:
    """A checkpoint's tensors after :func:`state_problem` found nothing, or a UserError naming the file and repair."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    problem = state_problem(path, sha256)
    if problem:
        raise file_error(path, "corrupt checkpoint", problem)
    try:
        return load_file(str(path), device=device)
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise file_error(path, "unreadable checkpoint", e) from None
