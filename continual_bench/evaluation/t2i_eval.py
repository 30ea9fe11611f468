"""Generation and evaluation of one text-to-image continual run.

``generate_run``: for every task t, rebuild the model after task t from its checkpoint and sample
concept t (for P, "right after learning"); after the last task sample every concept (for A and F).
With ``full_matrix`` every concept k <= t is sampled after every task t (O(T^2) generations).
Samples go to one ``samples.npz`` (keys ``after{t}_concept{k}``, uint8 N x H x W x 3).

``evaluate_run``: judge features of samples and real images -> R[t][k] for KID, CLIP image alignment
and (toy world) oracle accuracy -> ``R.csv`` (long) and ``metrics.csv`` (P/A/F per metric, N_train,
N_store, takeover), every row with provenance.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.datasets import PreparedDataset, load_images
from ..engine.t2i import RunSpec
from ..utils import UserError, atomic_path, atomic_write_text, stable_seed
from . import metrics as M

log = logging.getLogger(__name__)


def sample_key(t: int, k: int) -> str:
    return f"after{t}_concept{k}"


def pairs_to_generate(n_tasks: int, full_matrix: bool) -> list[tuple[int, int]]:
    T = n_tasks
    if full_matrix:
        return [(t, k) for t in range(1, T + 1) for k in range(1, t + 1)]
    return [(t, t) for t in range(1, T + 1)] + [(T, k) for k in range(1, T)]


def generate_run(spec: RunSpec, ckpt_root: str | Path, out_npz: str | Path, *, n_samples: int = 48,
                 steps: int = 25, guidance: float = 5.0, full_matrix: bool = False) -> dict[str, np.ndarray]:
    ckpt_dir = spec.checkpoint_dir(ckpt_root)
    if not (ckpt_dir / f"task_{spec.n_tasks:03d}" / "meta.json").is_file():
        raise UserError(f"{ckpt_dir}: no checkpoint of task {spec.n_tasks}; run the train step with the same settings")
    pairs = pairs_to_generate(spec.n_tasks, full_matrix)
    out: dict[str, np.ndarray] = {}
    for t in tqdm(range(1, spec.n_tasks + 1), desc="generate", mininterval=5):
        ks = [k for (tt, k) in pairs if tt == t]
        if not ks:
            continue
        method = spec.restore(ckpt_dir, t)
        for k in ks:
            out[sample_key(t, k)] = method.generate(spec.tasks[k - 1], n_samples,
                                                    seed=stable_seed("generate", spec.seed, k),
                                                    steps=steps, guidance=guidance)
    # the same seed per concept at every t: differences between R[t][k] and R[k][k] come from the model only
    with atomic_path(out_npz, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **out)
    return out


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def real_reference(ds: PreparedDataset, concept: str) -> torch.Tensor:
    """A concept's real reference images: its held-out ``eval`` split when the dataset has one, else all."""
    recs = [r for r in ds.records(concept=concept) if r.split == "eval"] or ds.records(concept=concept)
    return load_images([r.path for r in recs])


def evaluate_run(*, train_json: str | Path, samples_npz: str | Path, data_dir: str | Path, judge, oracle=None,
                 ident: dict, provenance: dict, out_metrics: str | Path, out_R: str | Path) -> pd.DataFrame:
    """Compute R[t][k] and the run's aggregate metrics; write both CSVs atomically."""
    info = json.loads(Path(train_json).read_text())
    sequence = info["sequence"]
    T = len(sequence)
    ds = PreparedDataset(data_dir)
    try:
        samples = dict(np.load(samples_npz))
    except (OSError, ValueError) as e:
        raise UserError(f"{samples_npz}: unreadable samples file ({e})") from None
    real_feats_of: dict[str, torch.Tensor] = {}  # judge features of each concept's real images, computed once
    rows = []
    last = sequence[-1]
    for key in sorted(samples):
        t, k = (int(x) for x in key.replace("after", "").split("_concept"))
        concept = sequence[k - 1]
        if concept not in real_feats_of:
            real_feats_of[concept] = judge.image_features(real_reference(ds, concept), normalize=False)
        real_feats = real_feats_of[concept]
        fake = _to_tensor(samples[key])
        fake_feats = judge.image_features(fake, normalize=False)
        vals = {"mmd": M.kid(real_feats, fake_feats, seed=stable_seed("kid", t, k)),
                "clip": M.clip_image_alignment(real_feats, fake_feats)}
        if oracle is not None:
            preds = oracle.predict(fake)
            vals["oracle"] = M.oracle_accuracy(preds, concept)
            if t == T and k < T:
                vals["takeover"] = M.oracle_accuracy(preds, last)
        for metric, value in vals.items():
            rows.append({"after_task": t, "concept_index": k, "concept": concept, "metric": metric, "value": value})
    R = pd.DataFrame(rows)
    summary: dict[str, float] = {}
    for metric, hib in M.HIGHER_IS_BETTER.items():
        sub = R[R.metric == metric]
        if sub.empty:
            continue
        table = {(int(r.after_task), int(r.concept_index)): float(r.value) for r in sub.itertuples()}
        for agg, v in M.summarize_R(table, T, hib).items():
            summary[f"{agg}_{metric}"] = v
    tk = R[R.metric == "takeover"]
    if not tk.empty:
        summary["takeover"] = float(tk.value.mean())
    summary["N_train"] = float(np.mean([m["N_train"] for m in info["tasks"]]))
    summary["N_store"] = float(info["tasks"][-1]["N_store"])
    prov = {**ident, **provenance}
    out = pd.DataFrame([{**ident, "metric": m, "value": v, **provenance} for m, v in summary.items()])
    cols = ["track", "benchmark", "n_tasks", "method", "seed", "metric", "value"]
    out = out[cols + [c for c in out.columns if c not in cols]]
    for df, path in ((out, out_metrics), (R.assign(**prov), out_R)):
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.6g")
        atomic_write_text(path, buf.getvalue())
    return out
