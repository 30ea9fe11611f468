"""ImageNet-R with CODA-Prompt's fixed split: read the split files, prepare the dataset folder.

The split is not drawn at run time: CODA-Prompt's ``dataloaders/splits/imagenet-r_{train,test}.yaml``
(commit 6417d4f6, REFERENCE.md section 2) list every image as ``data/imagenet-r/<wnid>/<file>.jpg`` with
an integer target. 24,000 train / 6,000 test images, 200 labels, no overlap. The label ids are NOT the
sorted-wnid order: **the yaml is the label map** (each wnid must carry one label in both files).

:func:`prepare_imagenet_r` links an extracted ImageNet-R tree into the prepared classification layout
(:mod:`continual_bench.data.cls_data`): ``<out>/<label:03d>/<wnid>__<file>.jpg`` (symlinks by default),
``manifest.csv`` with split ``train`` / ``test``, and ``dataset.json`` with the label -> wnid map and the
split files' sha256. The classification code then reads toy and real data the same way.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..utils import UserError, atomic_write_text

SPLIT_FILES = {"train": "imagenet-r_train.yaml", "test": "imagenet-r_test.yaml"}
SPLIT_SHA256 = {"train": "6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845",
                "test": "57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a"}
N_CLASSES, N_TRAIN, N_TEST = 200, 24000, 6000
PREFIX = "data/imagenet-r/"


@dataclass
class ImageNetRSplit:
    """One split file: relative image paths (``<wnid>/<file>.jpg``) and their integer labels."""

    paths: list[str]
    targets: list[int]

    @property
    def wnids(self) -> list[str]:
        return [p.split("/")[0] for p in self.paths]


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_split(path: str | Path) -> ImageNetRSplit:
    """Parse a CODA-Prompt split yaml ``{data: [data/imagenet-r/<wnid>/<file>.jpg], targets: [int]}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ImageNet-R split file not found (fetch it with the imagenet_r manifest)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(path.read_text(), Loader=loader)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not a valid split yaml ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not {"data", "targets"} <= set(doc):
        raise UserError(f"{path}: expected keys 'data' and 'targets'")
    data, targets = doc["data"], doc["targets"]
    if len(data) != len(targets):
        raise UserError(f"{path}: {len(data)} paths but {len(targets)} targets")
    paths = []
    for p in data:
        if not isinstance(p, str) or not p.startswith(PREFIX) or p.count("/") != 3:
            raise UserError(f"{path}: unexpected image path {p!r} (expected {PREFIX}<wnid>/<file>.jpg)")
        paths.append(p[len(PREFIX):])
    if not all(isinstance(t, int) and 0 <= t < N_CLASSES for t in targets):
        raise UserError(f"{path}: targets must be integers in 0..{N_CLASSES - 1}")
    return ImageNetRSplit(paths, [int(t) for t in targets])


def read_splits(splits_dir: str | Path, verify: bool = True) -> dict[str, ImageNetRSplit]:
    """Both split files of ``splits_dir``, checked against each other: sizes, labels, no overlap, one label
    per wnid. With ``verify`` the files' sha256 must be the pinned ones."""
    splits_dir = Path(splits_dir)
    out = {}
    for split, name in SPLIT_FILES.items():
        f = splits_dir / name
        if verify and f.is_file() and sha256(f) != SPLIT_SHA256[split]:
            raise UserError(f"{f}: sha256 differs from CODA-Prompt's pinned split file ({SPLIT_SHA256[split][:12]}...)")
        out[split] = read_split(f)
    tr, te = out["train"], out["test"]
    if verify and (len(tr.paths), len(te.paths)) != (N_TRAIN, N_TEST):
        raise UserError(f"{splits_dir}: {len(tr.paths)} train / {len(te.paths)} test images; expected {N_TRAIN} / {N_TEST}")
    overlap = set(tr.paths) & set(te.paths)
    if overlap:
        raise UserError(f"{splits_dir}: {len(overlap)} images in both splits, e.g. {sorted(overlap)[0]}")
    label_map = label_to_wnid(out)
    if verify and sorted(label_map) != list(range(N_CLASSES)):
        raise UserError(f"{splits_dir}: {len(label_map)} labels; expected {N_CLASSES}")
    return out


def label_to_wnid(splits: dict[str, ImageNetRSplit]) -> dict[int, str]:
    """The label map the yaml defines; a wnid with two labels (or a label with two wnids) is an error."""
    l2w: dict[int, str] = {}
    w2l: dict[str, int] = {}
    for s in splits.values():
        for w, t in zip(s.wnids, s.targets):
            if l2w.setdefault(t, w) != w or w2l.setdefault(w, t) != t:
                raise UserError(f"split files disagree: label {t} / wnid {w} map to more than one class")
    return dict(sorted(l2w.items()))


def _source(images_root: Path, rel: str) -> Path:
    for cand in (images_root / "imagenet-r" / rel, images_root / rel):
        if cand.is_file():
            return cand
    raise UserError(f"{images_root}: image imagenet-r/{rel} listed in the split file is missing "
                    "(is the archive fully extracted?)")


def prepare_imagenet_r(images_root: str | Path, splits_dir: str | Path, out: str | Path, *, mode: str = "symlink",
                       verify: bool = True) -> Path:
    """Link (``symlink``, ``hardlink``) or ``copy`` the images of both splits into ``out`` in the prepared
    classification layout; ``images_root`` holds ``imagenet-r/<wnid>/<file>.jpg`` (or the wnid folders)."""
    if mode not in ("symlink", "hardlink", "copy"):
        raise UserError(f"prepare_imagenet_r: mode must be symlink, hardlink or copy, got {mode!r}")
    images_root, out = Path(images_root).resolve(), Path(out)
    splits = read_splits(splits_dir, verify=verify)
    l2w = label_to_wnid(splits)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, s in splits.items():
        for rel, t in zip(s.paths, s.targets):
            wnid, fname = rel.split("/")
            src = _source(images_root, rel)
            dst_rel = f"{t:03d}/{wnid}__{fname}"
            dst = out / dst_rel
            dst.parent.mkdir(exist_ok=True)
            if not dst.exists():
                if mode == "symlink":
                    os.symlink(src, dst)
                elif mode == "hardlink":
                    os.link(src, dst)
                else:
                    shutil.copy2(src, dst)
            rendition = fname.rsplit("_", 1)[0]
            rows.append({"path": dst_rel, "concept": f"{t:03d}", "split": split,
                         "caption": f"a {rendition} of {wnid}"})
    meta = {"name": "imagenet_r", "label_to_wnid": {f"{k:03d}": w for k, w in l2w.items()},
            "n_train": len(splits["train"].paths), "n_test": len(splits["test"].paths),
            "split_sha256": {k: sha256(Path(splits_dir) / f) for k, f in SPLIT_FILES.items()},
            "source": "CODA-Prompt dataloaders/splits @ 6417d4f68754be68b697c7ca2323ee61e791e1a3"}
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1, sort_keys=True))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "concept", "split", "caption"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    return out
