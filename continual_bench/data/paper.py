"""Shared pieces of the paper profile's data preparation: the prepared layout, images, the fetch step.

Every real dataset is brought into the layout the toy world writes (:mod:`continual_bench.data.toy`), so
training, generation and evaluation read toy and real data the same way::

    <out>/manifest.csv            path,concept,split,caption   (path relative to <out>; written last)
    <out>/world.json              where the data came from, the selection rule and its parameters, per concept
    <out>/generic/000123.png      images of the class without a concept ("a photo of a person")
    <out>/<concept>/train_000.png, eval_000.png, ...

Concept pools. Preparation writes a pool of concepts per benchmark, drawn with ``data_seed``; a run then
draws its ``n_tasks`` concepts and their order from the pool with the run's seed
(:func:`continual_bench.engine.t2i.task_sequence`), exactly as in the toy world. Celeb-A HQ's pool is by
default every identity with enough images, so a run's seed really samples its celebrities among all of
them; GLDv2's pool is as large as the configured number of waterfalls (downloads cost time).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from PIL import Image, ImageOps

from ..utils import UserError, atomic_write_text
from .manifests import Manifest, load_manifest

log = logging.getLogger("continual_bench")

GENERIC = "generic"
MANIFEST_COLUMNS = ("path", "concept", "split", "caption")  # = datasets.MANIFEST_COLUMNS (that module imports torch)


# ------------------------------------------------------------------------------------------ layout
def square_image(src: str | Path, size: int) -> Image.Image:
    """``src`` as RGB, centre-cropped to a square and resized to ``size`` x ``size`` (Lanczos)."""
    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            return ImageOps.fit(im, (size, size), Image.LANCZOS)
    except FileNotFoundError:
        raise UserError(f"{src}: image not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{src}: corrupt or unreadable image ({' '.join(str(exc).split())})") from None


class LayoutWriter:
    """Writes images into ``<out>/<concept>/<split>_<i>.png`` (``generic/<i>.png``) and collects manifest rows."""

    def __init__(self, out: str | Path, size: int):
        self.out = Path(out)
        self.size = size
        self.rows: list[dict] = []
        self._count: dict[tuple[str, str], int] = {}
        if (self.out / "manifest.csv").exists():  # a rerun rewrites everything; the manifest comes last
            (self.out / "manifest.csv").unlink()
        self.out.mkdir(parents=True, exist_ok=True)

    def add(self, src: str | Path, concept: str, split: str, caption: str) -> str:
        i = self._count.get((concept, split), 0)
        self._count[(concept, split)] = i + 1
        rel = f"{GENERIC}/{i:06d}.png" if concept == GENERIC else f"{concept}/{split}_{i:03d}.png"
        dest = self.out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        square_image(src, self.size).save(dest)
        self.rows.append({"path": rel, "concept": concept, "split": split, "caption": caption})
        return rel

    def finish(self, meta: dict) -> Path:
        """world.json, then manifest.csv (its presence means "complete")."""
        if not self.rows:
            raise UserError(f"{self.out}: nothing to write (no images were selected)")
        atomic_write_text(self.out / "world.json", json.dumps(meta, indent=1, sort_keys=True))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.out / "manifest.csv", buf.getvalue())
        return self.out


def class_caption(class_word: str) -> str:
    """Real datasets name no attributes: every image is captioned with its class ("a photo of a person")."""
    return f"a photo of a {class_word}"


def split_images(paths: list, n_eval: int) -> list[tuple[object, str]]:
    """The last ``n_eval`` images of a concept are held out as ``eval`` (metric references), the rest ``train``.

    ``n_eval = 0`` (the default of the paper profile): every image trains, and evaluation compares samples
    with the training images, as Custom Diffusion's evaluation does.
    """
    if n_eval < 0 or n_eval >= len(paths):
        raise UserError(f"n_eval={n_eval} leaves no training image among {len(paths)}")
    cut = len(paths) - n_eval
    return [(p, "train" if i < cut else "eval") for i, p in enumerate(paths)]


def selection_params(manifest: Manifest, overrides: dict | None, allowed: dict) -> dict:
    """The manifest's ``selection.params`` with ``overrides`` (the config's), checked against ``allowed``
    (name -> default); an unknown name is an error naming it."""
    params = {**allowed, **{k: v for k, v in manifest.selection_params.items() if k in allowed}}
    for key, value in (overrides or {}).items():
        if key not in allowed:
            raise UserError(f"{manifest.name}: unknown selection setting '{key}' (known: {', '.join(sorted(allowed))})")
        if value is not None or allowed[key] is None:
            params[key] = value
    return params


# ------------------------------------------------------------------------------------------- fetch
def fetch_dataset(manifest: str | Path, out: str | Path, *, manual_dir: str | Path | None = None,
                  offline: bool = False, base_url: str | None = None, record: str | Path | None = None,
                  lock: str | Path | None = None, **kwargs) -> Path:
    """Fetch (or, offline, verify) every file of a manifest into ``out``; write ``fetched.json`` last."""
    from .fetch import ChecksumLock, fetch_manifest, write_fetch_record

    m = load_manifest(manifest)
    out = Path(out)
    chk = ChecksumLock(lock or out / "checksums.lock.json")
    files = fetch_manifest(m, out, manual_dir=manual_dir, lock=chk, offline=offline, base_url=base_url, **kwargs)
    return write_fetch_record(files, record or out / "fetched.json", manifest=m, lock=chk)


# -------------------------------------------------------------------------------------- ImageNet-R
def prepare_imagenet_r_from_manifest(raw: str | Path, out: str | Path, *, manifest: str | Path = "imagenet_r",
                                     mode: str = "symlink") -> Path:
    """Prepare ImageNet-R fetched with ``manifest`` (images in ``raw/images``, split files in ``raw/splits``).

    The split files are checked against the manifest that fetched them (sha256) and the manifest's
    ``n_classes``/``n_train``/``n_test``: with the shipped manifest those are CODA-Prompt's pinned values
    (as :func:`~continual_bench.data.imagenet_r.read_splits` checks them); a test's manifest may describe a
    small fake tree. Adds ``world.json`` (the toy layout's name for the dataset's description) next to
    ``dataset.json``.
    """
    from .fetch import sha256_file
    from .imagenet_r import SPLIT_FILES, SPLIT_SHA256, prepare_imagenet_r, read_splits

    m = load_manifest(manifest)
    raw, out = Path(raw), Path(out)
    splits_dir = raw / "splits"
    pins = {f.path: f.sha256 for f in m.files}
    official = all(pins.get(f"splits/{name}") == SPLIT_SHA256[split] for split, name in SPLIT_FILES.items())
    if not official:
        for name in SPLIT_FILES.values():
            want, f = pins.get(f"splits/{name}"), splits_dir / name
            if want and f.is_file() and sha256_file(f) != want:
                raise UserError(f"{f}: sha256 differs from {m.source} ({want[:12]}...)")
        splits = read_splits(splits_dir, verify=False)
        p = m.selection_params
        got = (len({t for s in splits.values() for t in s.targets}), len(splits["train"].paths), len(splits["test"].paths))
        want = (p.get("n_classes"), p.get("n_train"), p.get("n_test"))
        if got != want:
            raise UserError(f"{splits_dir}: {got[0]} classes, {got[1]} train / {got[2]} test images; "
                            f"{m.source} says {want[0]}, {want[1]} / {want[2]}")
    prepare_imagenet_r(raw / "images", splits_dir, out, mode=mode, verify=official)
    meta = json.loads((out / "dataset.json").read_text())
    meta.update({"manifest": str(m.source), "selection": {"rule": m.selection_rule, "params": m.selection_params}})
    atomic_write_text(out / "world.json", json.dumps(meta, indent=1, sort_keys=True))
    # manifest.csv was written before world.json: rewrite it last so that its presence still means "complete"
    text = (out / "manifest.csv").read_text()
    atomic_write_text(out / "manifest.csv", text)
    return out
