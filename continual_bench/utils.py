"""Small shared helpers: atomic writes, stable seeds, thread limits, provenance, progress bars, logging."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("continual_bench")


class UserError(Exception):
    """Bad input from the user: the CLI prints its message as one line and exits with status 2."""


def stable_seed(*parts) -> int:
    """A 31-bit seed derived from any printable parts (independent of PYTHONHASHSEED)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(n: int | None) -> None:
    """Limit torch to ``n`` threads (the job's Snakemake ``threads``): oversubscribed cores stall jobs."""
    import torch

    if n:
        torch.set_num_threads(int(n))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def config_hash(obj) -> str:
    """Short hash of a JSON-serialisable config (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# What "-dirty" in a row's git_commit looks at: the code that computes results. Edits to the README, to committed
# results or to the config (the rows carry its hash) leave a result the commit's code would compute.
CODE_PATHS = ("continual_bench", "workflow", "Snakefile", "pyproject.toml")


def git_commit(root: str | Path | None = None) -> str:
    """The checkout's commit (12 hex digits), with ``-dirty`` when a tracked file of :data:`CODE_PATHS` differs from
    it; ``unknown`` outside a git checkout. ``root``: the checkout (default: the one holding this package)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")


def weights_fingerprint(path: str | Path | None) -> str:
    """12 hex digits of sha256 over a model's weight files: ``path`` is one file, or a folder searched recursively
    for :data:`WEIGHT_PATTERNS` (each file's path relative to the folder is hashed with its contents). ``none`` for no
    path, ``unknown`` for a folder without weight files. Equal fingerprints mean byte-identical weights; the toy
    world's models are pretrained by the DAG, and another CPU gives other floats, so other fingerprints."""
    if path is None:
        return "none"
    path = Path(path)
    files = [path] if path.is_file() else sorted({p for pat in WEIGHT_PATTERNS for p in path.rglob(pat) if p.is_file()})
    if not files:
        return "unknown"
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()[:12]


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "diffusers", "transformers", "peft", "open_clip_torch", "torchmetrics", "timm"):
        try:
            out.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            pass
    return ";".join(out)


def provenance(cfg, weights: dict[str, str] | None = None) -> dict:
    """Columns every result row carries; ``weights`` (role -> :func:`weights_fingerprint`, e.g. backbone, judge,
    oracle) adds the ``weights`` column, ``backbone=<fp>;judge=<fp>;...``: which models the numbers came from."""
    from . import __version__

    out = {"config_hash": config_hash(cfg), "git_commit": git_commit(), "continual_bench": __version__,
           "python": sys.version.split()[0], "packages": package_versions()}
    if weights is not None:
        out["weights"] = ";".join(f"{role}={fp}" for role, fp in weights.items())
    return out


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (a job's log), redrawn at most every 5 s; ``CONTINUAL_BENCH_NO_TQDM=1`` hides it
    (the tests set it). Keyword arguments go to tqdm (``total``, ``desc``, ``unit``, ...)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 5)
    kwargs.setdefault("disable", os.environ.get("CONTINUAL_BENCH_NO_TQDM") == "1")
    return tqdm(iterable, **kwargs)


def setup_logging(log_file: str | Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
