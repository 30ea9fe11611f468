"""Prepared classification datasets and the CODA-Prompt class-incremental protocol.

A classification dataset uses the prepared-dataset layout (:mod:`continual_bench.data.datasets`): one
folder per class whose name is the class's integer **label id** (``"000"``, ``"001"``, ...), and the
manifest's ``split`` column says ``train`` / ``test`` (``pretrain``: images only the toy backbone's
pretraining reads). ``toy_imagenet_r`` is written this way; real ImageNet-R is linked into it by
:func:`continual_bench.data.imagenet_r.prepare_imagenet_r`.

Class order and tasks (CODA-Prompt ``trainer.py``, REFERENCE.md section 2): seed 0 keeps the label
order ``0..C-1``; seed s > 0 shuffles it with Python's ``random.seed(s); random.shuffle(order)``. Tasks
are consecutive chunks of ``C / n_tasks`` classes. Head output ``j`` is the ``j``-th class of the order
(CODA-P maps labels to their position in the order), so task ``t`` (1-based) owns outputs
``[(t-1) C/T, t C/T)`` and "the classes seen so far" is always a prefix of the outputs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..utils import UserError
from .datasets import PreparedDataset, load_images


def class_order(n_classes: int, seed: int) -> list[int]:
    """CODA-Prompt's class order: label order for seed 0, ``random.seed(seed); random.shuffle`` otherwise."""
    order = list(range(n_classes))
    if seed > 0:
        rnd = random.Random(seed)  # the same stream as random.seed(seed) on the global generator
        rnd.shuffle(order)
    return order


def task_classes(order: list[int], n_tasks: int) -> list[list[int]]:
    """Consecutive equal chunks of ``order``; an uneven split is an error (the protocol assumes equal tasks)."""
    if n_tasks < 1 or len(order) % n_tasks:
        raise UserError(f"n_tasks={n_tasks} does not divide the {len(order)} classes into equal tasks")
    k = len(order) // n_tasks
    return [order[i * k:(i + 1) * k] for i in range(n_tasks)]


@dataclass
class Split:
    """Image paths and their label ids (one split of a classification dataset)."""

    paths: list[Path]
    labels: np.ndarray  # int64 label ids (dataset label map, not head positions)

    def select(self, labels) -> "Split":
        keep = np.isin(self.labels, np.asarray(list(labels)))
        return Split([p for p, k in zip(self.paths, keep) if k], self.labels[keep])

    def __len__(self) -> int:
        return len(self.paths)


class ClsDataset:
    """A prepared classification dataset directory (class folders named by label id)."""

    def __init__(self, root: str | Path):
        self.ds = PreparedDataset(root)
        self.root = self.ds.root
        labels = set()
        for r in self.ds.records():
            if r.split in ("train", "test"):
                try:
                    labels.add(int(r.concept))
                except ValueError:
                    raise UserError(f"{self.root / 'manifest.csv'}: class {r.concept!r} is not an integer label id "
                                    "(classification datasets name each class folder by its label id)") from None
        if not labels:
            raise UserError(f"{self.root / 'manifest.csv'}: no train/test rows")
        self.labels = sorted(labels)
        if self.labels != list(range(len(self.labels))):
            raise UserError(f"{self.root / 'manifest.csv'}: label ids must be 0..C-1, got {len(self.labels)} ids "
                            f"from {self.labels[0]} to {self.labels[-1]}")

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def split(self, split: str) -> Split:
        recs = [r for r in self.ds.records(split=split)]
        if not recs:
            raise UserError(f"{self.root / 'manifest.csv'}: no rows with split={split!r}")
        return Split([r.path for r in recs], np.array([int(r.concept) for r in recs], dtype=np.int64))


def holdout_split(train: Split, fraction: float, where: str = "cls_train.val_fraction") -> tuple[Split, Split]:
    """(rest, held out): per class, ``max(1, round(fraction * n))`` of its ``n`` training images held out.

    Which images is fixed per dataset class: a numpy permutation seeded with ``stable_seed("cls-val", label)``,
    independent of the run's seed, method and settings, so every run of a selection grid validates on the same
    images; both parts keep the manifest's order. A class that would keep no training image is an error
    naming ``where``."""
    from ..utils import stable_seed

    if not 0.0 < fraction < 1.0:
        raise UserError(f"{where} must be in [0, 1) (0 = off), got {fraction!r}")
    held = np.zeros(len(train), dtype=bool)
    for label in np.unique(train.labels):
        idx = np.nonzero(train.labels == label)[0]
        n_val = max(1, int(round(fraction * len(idx))))
        if n_val >= len(idx):
            raise UserError(f"{where}={fraction}: class {int(label)} has {len(idx)} training image(s); holding out "
                            f"{n_val} leaves none to train on")
        perm = np.random.default_rng(stable_seed("cls-val", int(label))).permutation(len(idx))
        held[idx[perm[:n_val]]] = True
    pick = lambda mask: Split([p for p, k in zip(train.paths, mask) if k], train.labels[mask])  # noqa: E731
    return pick(~held), pick(held)


def load_split_tensor(split: Split, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``split`` in memory as uint8 (N, 3, H, W) and their label ids (for small datasets)."""
    if len(split) == 0:
        return torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    x = load_images(split.paths, size=size)
    return (x * 255).round().to(torch.uint8), torch.from_numpy(split.labels)
