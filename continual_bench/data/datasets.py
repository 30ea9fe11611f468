"""Prepared datasets on disk: ``<root>/manifest.csv`` (path, concept, split, caption) + image folders.

Toy worlds are written in this layout directly; real datasets (Celeb-A HQ identities, GLDv2 waterfalls)
are brought into it by their preparation rules, so everything downstream reads one format.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..utils import UserError

MANIFEST_COLUMNS = ("path", "concept", "split", "caption")


@dataclass(frozen=True)
class Record:
    path: Path
    concept: str
    split: str
    caption: str


class PreparedDataset:
    """A prepared dataset directory. ``records(concept=..., split=...)`` filters the manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.csv"
        if not manifest.is_file():
            raise UserError(f"{manifest}: missing; prepare the dataset first (snakemake data/...)")
        with open(manifest, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{manifest}: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
            self._records = [Record(self.root / r["path"], r["concept"], r["split"], r["caption"]) for r in reader]
        if not self._records:
            raise UserError(f"{manifest}: no rows")

    @property
    def name(self) -> str:
        return self.root.name

    def concepts(self) -> list[str]:
        """Concept names in manifest order, without the generic class."""
        seen: dict[str, None] = {}
        for r in self._records:
            if r.concept != "generic":
                seen.setdefault(r.concept)
        return list(seen)

    def records(self, concept: str | None = None, split: str | None = None) -> list[Record]:
        out = [r for r in self._records if (concept is None or r.concept == concept) and (split is None or r.split == split)]
        if concept is not None and not out:
            raise UserError(f"{self.root / 'manifest.csv'}: no images for concept={concept!r} split={split!r}")
        return out

    def images(self, concept: str | None = None, split: str | None = None, size: int | None = None) -> torch.Tensor:
        """Images as a float tensor (N, 3, H, W) in [0, 1]."""
        return load_images([r.path for r in self.records(concept, split)], size=size)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise UserError(f"{path}: image listed in the manifest does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{path}: corrupt or unreadable image ({e.__class__.__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_images(paths, size: int | None = None) -> torch.Tensor:
    return torch.stack([load_image(p, size) for p in paths])
