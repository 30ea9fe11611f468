"""The metrics' own noise: how far a value moves when nothing changed.

A forgetting value ``F = R[k][k] - R[T][k]`` or a gap between two methods is only a finding when it is larger than
what drawing another set of images gives. This module measures that floor for every text-to-image metric
(``mmd``, ``clip``, ``clip_t``, ``oracle``, the same functions ``evaluate_run`` scores with), per benchmark:

* ``real_halves``: the metric between two disjoint thirds of a concept's real images, one as the reference and one
  as the "samples": the value a perfect generator would get (KID ~ 0, CLIP image alignment at its ceiling).
* ``real_diff``: the null difference ``m(ref, X) - m(ref, Y)`` for two further disjoint thirds X, Y of the same
  concept's real images against the same reference ``ref``: what a forgetting value reads when the two sets come
  from one distribution (reference noise cancels, as it does in F, which scores both sets against one reference).
* ``sampling_diff``: the same null difference for one model's samples drawn with two seeds: the base backbone given
  the concept's caption, ``n_samples`` images per set at the evaluation's steps and guidance, scored against the
  evaluation's own reference set. This is the floor at the evaluation's set size, and the one tables use.

Each row of ``noise_floor.csv`` is ``benchmark, metric, source, mean, std, n, set_size``: the mean and sample
standard deviation (ddof=1) over ``n`` (concept, repeat) pairs.

How tables use it (``floor_of_column``): with ``s`` the std of ``sampling_diff`` (else ``real_diff``), a table cell
is a mean over ``n_seeds`` seeds and over concepts, so under the null a gap between two cells has standard deviation

    P_m, A_m  (mean of T values, each with sd s / sqrt(2)):       s / sqrt(T * n_seeds)
    F_m       (mean of T - 1 differences, each with sd s):        sqrt(2) * s / sqrt((T - 1) * n_seeds)
    Frel_m    (one difference, the generic prompt's):             sqrt(2) * s / sqrt(n_seeds)

and the floor of a column is twice that (two standard deviations). Concepts and seeds are taken as independent,
so this is the sampling floor only; differences between seeds are what the tables' Welch test covers.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import UserError, atomic_write_text, stable_seed

# torch and the evaluation code are imported where the floor is measured, not here: ``reporting`` reads floors
# through the functions at the end of this module and stays a pandas-only import (tables take seconds).

log = logging.getLogger(__name__)
COLUMNS = ["benchmark", "metric", "source", "mean", "std", "n", "set_size"]
FLOOR_SOURCES = ("sampling_diff", "real_diff")  # preferred first


class _Scorer:
    """Every metric of one concept, as evaluate_run scores it, against a fixed reference set."""

    def __init__(self, judge, oracle, concept: str, ref, text: str):
        self.judge, self.oracle, self.concept = judge, oracle, concept
        self.kid_features = judge.kid_features if getattr(judge, "kid_extractor", None) is not None else None
        self.ref = judge.image_features(ref, normalize=False)
        self.ref_kid = self.kid_features(ref) if self.kid_features else self.ref
        self.text = judge.text_features([text])

    def __call__(self, images) -> dict[str, float]:
        from . import metrics as M

        feats = self.judge.image_features(images, normalize=False)
        kid_feats = self.kid_features(images) if self.kid_features else feats
        vals = {"mmd": M.kid(self.ref_kid, kid_feats, seed=stable_seed("kid", self.concept, "concept")),
                "clip": M.clip_image_alignment(self.ref, feats),
                "clip_t": M.clip_text_alignment(self.text, feats)}
        if self.oracle is not None:
            vals["oracle"] = M.oracle_accuracy(self.oracle.predict(images), self.concept)
        return vals


def _concepts(ds, max_concepts: int, seed: int) -> list[str]:
    concepts = ds.concepts()
    if not concepts:
        raise UserError(f"{ds.root}: no concepts in manifest.csv")
    if len(concepts) > max_concepts:
        rng = np.random.default_rng(stable_seed("noise-floor-concepts", seed))
        concepts = [concepts[i] for i in sorted(rng.choice(len(concepts), max_concepts, replace=False))]
    return concepts


def real_floor(ds, judge, oracle, concepts: list[str], class_word: str, *, repeats: int = 5,
               seed: int = 0) -> list[dict]:
    """``real_halves`` and ``real_diff`` values per (concept, repeat): all of a concept's real images (every split)
    shuffled into three disjoint thirds ``ref, X, Y``."""
    import torch
    from tqdm.auto import tqdm

    from ..data.datasets import load_images
    from .t2i_eval import concept_text

    rows = []
    for c in tqdm(concepts, desc="noise floor: real", mininterval=5):
        recs = ds.records(concept=c)
        n = len(recs) // 3
        if n < 2:
            log.warning("noise floor: %s has %d real images (< 6); skipped", c, len(recs))
            continue
        images = load_images([r.path for r in recs])
        for r in range(repeats):
            perm = torch.from_numpy(np.random.default_rng(stable_seed("noise-floor-real", seed, c, r))
                                    .permutation(len(images)))
            ref, x, y = (images[perm[i * n:(i + 1) * n]] for i in range(3))
            score = _Scorer(judge, oracle, c, ref, concept_text(ds, c, class_word))
            vx, vy = score(x), score(y)
            for m in vx:
                rows.append({"metric": m, "source": "real_halves", "value": vx[m], "set_size": n})
                rows.append({"metric": m, "source": "real_diff", "value": vx[m] - vy[m], "set_size": n})
    return rows


def sampling_floor(ds, judge, oracle, concepts: list[str], class_word: str, model, *,
                   n_samples: int, steps: int, guidance: float, seed: int = 0) -> list[dict]:
    """``sampling_diff`` per concept: ``model`` (the base backbone) samples the concept's caption twice with two
    seeds; both sets are scored against the evaluation's reference set of the concept."""
    from tqdm.auto import tqdm

    from .t2i_eval import _to_tensor, concept_text, real_reference

    rows = []
    for c in tqdm(concepts, desc="noise floor: sampling", mininterval=5):
        text = concept_text(ds, c, class_word)
        score = _Scorer(judge, oracle, c, real_reference(ds, c), text)
        v = [score(_to_tensor(model.generate([text] * n_samples, seed=stable_seed("noise-floor-sample", seed, c, i),
                                             steps=steps, guidance=guidance))) for i in (0, 1)]
        for m in v[0]:
            rows.append({"metric": m, "source": "sampling_diff", "value": v[0][m] - v[1][m], "set_size": n_samples})
    return rows


def summarize_floor(rows: list[dict], benchmark: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        raise UserError(f"noise floor of {benchmark}: no concept has enough real images")
    out = (df.groupby(["metric", "source"], sort=True)
           .agg(mean=("value", "mean"), std=("value", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan),
                n=("value", "size"), set_size=("set_size", "min")).reset_index())
    out.insert(0, "benchmark", benchmark)
    return out[COLUMNS]


def write_noise_floor(*, data_dir, judge, oracle, benchmark: str, out: str | Path, model=None, n_samples: int = 32,
                      steps: int = 15, guidance: float = 1.5, max_concepts: int = 20, repeats: int = 5,
                      class_word: str = "", seed: int = 0) -> pd.DataFrame:
    """Measure a benchmark's floor (module docstring) and write it as CSV (atomically)."""
    from ..data.datasets import PreparedDataset

    ds = PreparedDataset(data_dir)
    concepts = _concepts(ds, max_concepts, seed)
    rows = real_floor(ds, judge, oracle, concepts, class_word, repeats=repeats, seed=seed)
    if model is not None:
        rows += sampling_floor(ds, judge, oracle, concepts, class_word, model, n_samples=n_samples, steps=steps,
                               guidance=guidance, seed=seed)
    table = summarize_floor(rows, benchmark)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6g")
    atomic_write_text(out, buf.getvalue())
    return table


# --------------------------------------------------------------------------------------------- used by tables
def load_noise_floor(paths) -> pd.DataFrame | None:
    """Concatenate per-benchmark floor files; None when there are none."""
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_csv(p))
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise UserError(f"{p}: unreadable noise-floor file ({e}); rerun its noise_floor job") from None
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"noise-floor files lack column(s) {missing}")
    return df[COLUMNS]


def floor_sd(floor: pd.DataFrame | None, benchmark: str, metric: str) -> float | None:
    """The std of a null difference of ``metric`` on ``benchmark`` (sampling_diff, else real_diff)."""
    if floor is None:
        return None
    for source in FLOOR_SOURCES:
        hit = floor[(floor.benchmark == benchmark) & (floor.metric == metric) & (floor.source == source)]
        if len(hit) and math.isfinite(float(hit["std"].iloc[0])):
            return float(hit["std"].iloc[0])
    return None


def floor_of_column(floor: pd.DataFrame | None, benchmark: str, column: str, n_tasks: int, n_seeds: int) -> float | None:
    """Two standard deviations of a null gap between two table cells of ``column`` (module docstring)."""
    agg, _, metric = column.partition("_")
    s = floor_sd(floor, benchmark, metric) if metric else None
    if s is None or n_seeds < 1:
        return None
    T = max(int(n_tasks), 2)
    if agg in ("P", "A"):
        return 2 * s / math.sqrt(T * n_seeds)
    if agg == "F":
        return 2 * math.sqrt(2) * s / math.sqrt((T - 1) * n_seeds)
    if agg == "Frel":
        return 2 * math.sqrt(2) * s / math.sqrt(n_seeds)
    return None
