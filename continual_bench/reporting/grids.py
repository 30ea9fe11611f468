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
    """Rows: the concepts in task order, then the bare class prompt (relevant-concept forgetting);
    columns: the base model, then after each task. Cells never sampled stay empty."""
    from ..evaluation.t2i_eval import generic_prompt, parse_sample_key

    from ..run_files import NPZ_ERRORS, file_error

    try:
        samples = np.load(samples_npz)
        T = len(train_info["sequence"])
        first = samples[next(iter(samples.files))]
        cell = tile(first, per_cell)
        # the training prompt's samples only (held-out text-template samples and the template list are skipped)
        keys = {parse_sample_key(key): key for key in samples.files if key.startswith("after") and "_text" not in key}
        with_generic = any(k == 0 for _, k in keys)
        n_rows = T + int(with_generic)
        grid = np.zeros((n_rows, T + 1) + cell.shape, np.uint8)
        present = np.zeros((n_rows, T + 1), bool)
        for (t, k), key in keys.items():
            row = k - 1 if k else T
            grid[row, t] = tile(samples[key], per_cell)
            present[row, t] = True
    except (*NPZ_ERRORS, StopIteration) as e:
        raise file_error(samples_npz, "unreadable or truncated samples file", e) from None
    rows = [f"{tok} ({c})" for tok, c in zip(train_info["tokens"], train_info["sequence"])]
    if with_generic:
        rows.append(f'"{generic_prompt(train_info.get("class_word", ""))}"')
    cols = ["base model"] + [f"after task {t}" for t in range(1, T + 1)]
    if not present[:, 0].any():
        grid, present, cols = grid[:, 1:], present[:, 1:], cols[1:]
    return sample_grid(grid, rows, cols, Path(out_path), title, present=present)
