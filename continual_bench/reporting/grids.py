"""Sample grids of a run: concepts (rows) x after which task (columns), from its ``samples.npz``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import sample_grid


def tile(images: np.ndarray, n: int = 4) -> np.ndarray:
    """The first ``n`` (a square number) images of a set as one square tile."""
    side = int(round(n ** 0.5))
    imgs = images[: side * side]
    if len(imgs) < side * side:
        imgs = np.concatenate([imgs, np.zeros((side * side - len(imgs),) + imgs.shape[1:], imgs.dtype)])
    h, w = imgs.shape[1:3]
    return imgs.reshape(side, side, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(side * h, side * w, 3)


def sample_grid_from_npz(samples_npz, train_info: dict, out_path, title: str, per_cell: int = 4) -> list[Path]:
    samples = np.load(samples_npz)
    T = len(train_info["sequence"])
    first = samples[next(iter(samples.files))]
    cell = tile(first, per_cell)
    grid = np.zeros((T, T) + cell.shape, np.uint8)
    present = np.zeros((T, T), bool)
    for key in samples.files:
        t, k = (int(x) for x in key.replace("after", "").split("_concept"))
        grid[k - 1, t - 1] = tile(samples[key], per_cell)
        present[k - 1, t - 1] = True
    rows = [f"{tok} ({c})" for tok, c in zip(train_info["tokens"], train_info["sequence"])]
    cols = [f"after task {t}" for t in range(1, T + 1)]
    return sample_grid(grid, rows, cols, Path(out_path), title, present=present)
