"""Generation and evaluation of one text-to-image continual run.

``generate_run``: for every task t, rebuild the model after task t from its checkpoint and sample
concept t (for P, "right after learning"); after the last task sample every concept (for A and F).
With ``full_matrix`` every concept k <= t is sampled after every task t (O(T^2) generations).
The generic-class prompt without any concept token ("a photo of a person") is sampled with the base
model (t = 0) and after the last task, for relevant-concept forgetting (LFS-Diffusion's first kind).
Samples go to one ``samples.npz`` (keys ``after{t}_concept{k}`` and ``after{t}_generic``, uint8
N x H x W x 3).

Held-out prompts (``text_templates``, e.g. ``"{prompt} on the beach"``): CLIP text alignment is meant to
be measured on prompts the concept was not trained with (Custom Diffusion sec. 5, C-LoRA's ``clip_t``).
When templates are given, every concept sample set also gets ``n_samples`` more images split evenly over
the templates, each filled with the method's own prompt for the concept (keys
``after{t}_concept{k}_text{i}``; the templates themselves are stored under ``text_templates``); KID and
image alignment stay on the training prompt's samples, and ``clip_t`` of a held-out sample is the cosine
with its template filled with the concept's class text instead of the token. Without templates (the toy
default: the toy text encoder knows only the toy captions), ``clip_t`` uses the training prompt's samples.

``evaluate_run``: judge features of samples and real images -> R[t][k] for KID, CLIP image alignment,
CLIP text alignment and (toy world) oracle accuracy -> ``R.csv`` (long; generic rows have
concept_index 0) and ``metrics.csv`` (P/A/F per metric, relevant-concept forgetting ``Frel_*``,
takeover and its base rates, N_train, N_store), every row with provenance. Its pieces: the references'
features (:class:`ReferenceFeatures`), per-sample-set scoring (:func:`score_samples`, :func:`counts_for_takeover`),
aggregation (:func:`summarize`) and writing (:func:`write_results`).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.datasets import PreparedDataset, load_images
from .oracle import GENERIC
from ..engine.t2i import RunSpec
from ..run_files import load_npz, read_json
from ..utils import UserError, atomic_path, atomic_write_text, progress, stable_seed
from . import metrics as M

log = logging.getLogger(__name__)


def sample_key(t: int, k: int) -> str:
    """``k = 0`` is the generic-class prompt."""
    return f"after{t}_generic" if k == 0 else f"after{t}_concept{k}"


def parse_sample_key(key: str) -> tuple[int, int]:
    t, rest = key.removeprefix("after").split("_", 1)
    return int(t), 0 if rest == "generic" else int(rest.removeprefix("concept"))


def text_key(t: int, k: int, i: int) -> str:
    """Samples of concept ``k`` after task ``t`` from held-out text template ``i``."""
    return f"{sample_key(t, k)}_text{i}"


TEXT_TEMPLATES_KEY = "text_templates"


def check_templates(templates) -> list[str]:
    templates = list(templates or [])
    for tpl in templates:
        if not isinstance(tpl, str) or "{prompt}" not in tpl or tpl.replace("{prompt}", "").count("{"):
            raise UserError(f"evaluation.text_templates: {tpl!r} must contain {{prompt}} and no other braces")
    return templates


def split_evenly(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def generic_prompt(class_word: str) -> str:
    """The relevant-concept prompt: the class word and no concept token (LFS-Diffusion's "a photo of a cat")."""
    return f"a photo of a {class_word}" if class_word else "a photo"


def pairs_to_generate(n_tasks: int, full_matrix: bool) -> list[tuple[int, int]]:
    T = n_tasks
    if full_matrix:
        return [(t, k) for t in range(1, T + 1) for k in range(1, t + 1)]
    return [(t, t) for t in range(1, T + 1)] + [(T, k) for k in range(1, T)]


def generate_run(spec: RunSpec, ckpt_root: str | Path, out_npz: str | Path, *, n_samples: int = 48,
                 steps: int = 25, guidance: float = 5.0, full_matrix: bool = False,
                 text_templates: list[str] | None = None) -> dict[str, np.ndarray]:
    ckpt_dir = spec.checkpoint_dir(ckpt_root)
    if not (ckpt_dir / f"task_{spec.n_tasks:03d}" / "meta.json").is_file():
        raise UserError(f"{ckpt_dir}: no checkpoint of task {spec.n_tasks}; run the train step with the same settings")
    T = spec.n_tasks
    templates = check_templates(text_templates)
    if templates and n_samples < len(templates):
        raise UserError(f"evaluation.n_samples={n_samples} is smaller than the {len(templates)} text templates")
    pairs = pairs_to_generate(T, full_matrix) + [(0, 0), (T, 0)]
    generic = generic_prompt(spec.tasks[0].class_word)
    out: dict[str, np.ndarray] = {}
    for t in tqdm(range(0, T + 1), desc="generate", mininterval=5):
        ks = [k for (tt, k) in pairs if tt == t]
        if not ks:
            continue
        method = spec.restore(ckpt_dir, t)
        for k in ks:
            kw = dict(seed=stable_seed("generate", spec.seed, k), steps=steps, guidance=guidance)
            out[sample_key(t, k)] = (method.generate_prompt(generic, n_samples, **kw) if k == 0 else
                                     method.generate(spec.tasks[k - 1], n_samples, **kw))
            if k == 0:
                continue
            for i, (tpl, n_i) in enumerate(zip(templates, split_evenly(n_samples, len(templates)))):
                prompt = tpl.format(prompt=method.prompt(spec.tasks[k - 1]))
                out[text_key(t, k, i)] = method.generate_prompt(
                    prompt, n_i, **{**kw, "seed": stable_seed("generate-text", spec.seed, k, i)})
    if templates:
        out[TEXT_TEMPLATES_KEY] = np.array(templates)
    # the same seed per concept at every t: differences between R[t][k] and R[k][k] come from the model only
    with atomic_path(out_npz, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **out)
    return out


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def real_reference(ds: PreparedDataset, concept: str, max_images: int = 256) -> torch.Tensor:
    """A concept's real reference images: its held-out ``eval`` split when the dataset has one, else all.

    For ``generic`` (the class without a concept), a seeded draw of at most ``max_images`` of its images.
    """
    recs = [r for r in ds.records(concept=concept) if r.split == "eval"] or ds.records(concept=concept)
    if not recs:
        raise UserError(f"{ds.root}: no real images of {concept!r} in manifest.csv")
    if len(recs) > max_images:
        rng = np.random.default_rng(stable_seed("reference", concept))
        recs = [recs[i] for i in sorted(rng.choice(len(recs), max_images, replace=False))]
    return load_images([r.path for r in recs])


def concept_text(ds: PreparedDataset, concept: str, class_word: str) -> str:
    """The text a concept's samples are aligned with (CLIP text alignment): its caption in the manifest
    (the toy world names its attributes; real datasets caption "a photo of a person"), else the generic prompt."""
    caps = [r.caption for r in ds.records(concept=concept) if r.caption]
    return caps[0] if caps else generic_prompt(class_word)


# ------------------------------------------------------------------------------------------- evaluation
class ReferenceFeatures:
    """What sample sets are scored against, in the judge's features, computed once per concept: its real images
    (image features, and KID features: the judge's own KID extractor when it has one, as the paper judge's
    Inception, else the same image features), its text, and each held-out template filled with its class text.

    The generic prompt's references (``GENERIC``) are the dataset's generic-class images, or, when it has none, the
    real images of every concept of the sequence; its text is the generic prompt."""

    def __init__(self, ds: PreparedDataset, sequence: list[str], class_word: str, judge):
        self.ds, self.sequence, self.class_word, self.judge = ds, sequence, class_word, judge
        self.has_generic = bool(ds.records(concept=GENERIC))
        self.kid_features = judge.kid_features if getattr(judge, "kid_extractor", None) is not None else None
        self._of: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._templates: dict[tuple[str, str], torch.Tensor] = {}

    def real_images(self, concept: str) -> torch.Tensor:
        if concept != GENERIC or self.has_generic:
            return real_reference(self.ds, concept)
        return torch.cat([real_reference(self.ds, c) for c in self.sequence])

    def of(self, concept: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, KID features, text features) of ``concept``'s references."""
        if concept not in self._of:
            real = self.real_images(concept)
            feats = self.judge.image_features(real, normalize=False)
            kid = self.kid_features(real) if self.kid_features else feats
            text = generic_prompt(self.class_word) if concept == GENERIC else concept_text(self.ds, concept,
                                                                                             self.class_word)
            self._of[concept] = (feats, kid, self.judge.text_features([text]))
        return self._of[concept]

    def template(self, concept: str, template: str) -> torch.Tensor:
        """Text features of a held-out template filled with the concept's class text (never its token)."""
        if (concept, template) not in self._templates:
            filled = template.format(prompt=concept_text(self.ds, concept, self.class_word))
            self._templates[concept, template] = self.judge.text_features([filled])
        return self._templates[concept, template]


def counts_for_takeover(t: int, k: int, n_tasks: int) -> bool:
    """Whether the oracle's takeover (the share of samples it calls the last concept) is measured on the samples of
    prompt ``k`` after task ``t``: every earlier concept's, and the generic prompt's, after the last task
    (``t == T``, ``k < T``), and the generic prompt's before the sequence (``t == 0``)."""
    return (t == n_tasks and k < n_tasks) or t == 0


def held_out_clip_t(parts: list[tuple[np.ndarray, str]], concept: str, refs: ReferenceFeatures) -> float:
    """CLIP text alignment of a concept's held-out-prompt samples: each set against its own template filled with
    the concept's class text, averaged weighted by the number of samples."""
    scores = []
    for imgs, tpl in parts:
        text = refs.template(concept, tpl)
        feats = refs.judge.image_features(_to_tensor(imgs), normalize=False)
        scores.append((M.clip_text_alignment(text, feats), len(imgs)))
    return float(sum(v * n for v, n in scores) / sum(n for _, n in scores))


def score_samples(images: np.ndarray, concept: str, refs: ReferenceFeatures, *,
                  held_out: list[tuple[np.ndarray, str]] = (), oracle=None,
                  takeover_of: str | None = None) -> dict[str, float]:
    """One sample set's values: KID x 1e3 (``mmd``), CLIP image alignment (``clip``) and text alignment (``clip_t``;
    a concept's held-out-prompt samples replace its training-prompt ones there); with an oracle, the share of a
    concept's samples it recognises (``oracle``) and, when ``takeover_of`` names a concept, the share it calls that
    one (``takeover``)."""
    generic = concept == GENERIC
    real_feats, real_kid, text_feats = refs.of(concept)
    fake = _to_tensor(images)
    fake_feats = refs.judge.image_features(fake, normalize=False)
    fake_kid = refs.kid_features(fake) if refs.kid_features else fake_feats
    # KID's subsets are seeded by the concept (and the prompt kind), never by t: identical samples before and
    # after the sequence score identically, so a method that changes nothing has F = Frel = 0 exactly
    kid_seed = stable_seed("kid", concept, "generic" if generic else "concept")
    vals = {"mmd": M.kid(real_kid, fake_kid, seed=kid_seed),
            "clip": M.clip_image_alignment(real_feats, fake_feats),
            "clip_t": M.clip_text_alignment(text_feats, fake_feats)}
    if held_out and not generic:
        vals["clip_t"] = held_out_clip_t(list(held_out), concept, refs)
    if oracle is not None:
        preds = oracle.predict(fake)
        if not generic:
            vals["oracle"] = M.oracle_accuracy(preds, concept)
        if takeover_of is not None:
            vals["takeover"] = M.oracle_accuracy(preds, takeover_of)
    return vals


def summarize(R: pd.DataFrame, n_tasks: int, tasks: list[dict]) -> dict[str, float]:
    """The run's aggregates from R (long: after_task, concept_index, metric, value; generic rows have concept_index
    0) and train.json's per-task records: P/A/F per metric, relevant-concept forgetting ``Frel_*`` (the generic
    prompt before vs after the sequence), takeover and its base rates, N_train (mean per task), N_store (final)."""
    T = n_tasks
    concepts_R, generic_R = R[R.concept_index > 0], R[R.concept_index == 0]
    summary: dict[str, float] = {}
    for metric, hib in M.HIGHER_IS_BETTER.items():
        sub = concepts_R[concepts_R.metric == metric]
        if sub.empty:
            continue
        table = {(int(r.after_task), int(r.concept_index)): float(r.value) for r in sub.itertuples()}
        for agg, v in M.summarize_R(table, T, hib).items():
            summary[f"{agg}_{metric}"] = v
    for metric, hib in M.HIGHER_IS_BETTER.items():
        sub = generic_R[generic_R.metric == metric].set_index("after_task").value
        if {0, T} <= set(sub.index):
            summary[f"Frel_{metric}"] = M.forgetting(float(sub[0]), float(sub[T]), hib)
    tk = concepts_R[concepts_R.metric == "takeover"]
    if not tk.empty:
        summary["takeover"] = float(tk.value.mean())
        gtk = generic_R[generic_R.metric == "takeover"].set_index("after_task").value
        if {0, T} <= set(gtk.index):  # the same oracle verdict on generic-prompt samples: base rate and after
            summary["takeover_base"] = float(gtk[0])
            summary["takeover_generic"] = float(gtk[T])
    summary["N_train"] = float(np.mean([m["N_train"] for m in tasks]))
    summary["N_store"] = float(tasks[-1]["N_store"])
    return summary


def write_results(summary: dict[str, float], R: pd.DataFrame, *, ident: dict, provenance: dict,
                  out_metrics: str | Path, out_R: str | Path) -> pd.DataFrame:
    """``metrics.csv`` (one row per aggregate) and ``R.csv``, both with the run's identity and provenance columns,
    written atomically; returns the metrics table."""
    out = pd.DataFrame([{**ident, "metric": m, "value": v, **provenance} for m, v in summary.items()])
    cols = ["track", "benchmark", "n_tasks", "method", "seed", "metric", "value"]
    out = out[cols + [c for c in out.columns if c not in cols]]
    for df, path in ((out, out_metrics), (R.assign(**{**ident, **provenance}), out_R)):
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.6g")
        atomic_write_text(path, buf.getvalue())
    return out


def evaluate_run(*, train_json: str | Path, samples_npz: str | Path, data_dir: str | Path, judge, oracle=None,
                 ident: dict, provenance: dict, out_metrics: str | Path, out_R: str | Path) -> pd.DataFrame:
    """Compute R[t][k] and the run's aggregate metrics; write both CSVs atomically."""
    info = read_json(train_json)
    sequence = info["sequence"]
    T = len(sequence)
    ds = PreparedDataset(data_dir)
    samples = load_npz(samples_npz)
    templates = [str(x) for x in samples.pop(TEXT_TEMPLATES_KEY, [])]
    held_out = {key: samples.pop(key) for key in [k for k in samples if "_text" in k]}
    refs = ReferenceFeatures(ds, sequence, info.get("class_word", ""), judge)
    rows = []
    for key in progress(sorted(samples, key=parse_sample_key), desc="evaluate", unit="sample set"):
        t, k = parse_sample_key(key)
        concept = sequence[k - 1] if k else GENERIC
        parts = [(held_out[text_key(t, k, i)], tpl) for i, tpl in enumerate(templates) if text_key(t, k, i) in held_out]
        vals = score_samples(samples[key], concept, refs, held_out=parts, oracle=oracle,
                             takeover_of=sequence[-1] if counts_for_takeover(t, k, T) else None)
        for metric, value in vals.items():
            rows.append({"after_task": t, "concept_index": k, "concept": concept, "metric": metric, "value": value})
        log.info("evaluated %s after task %d: %s", concept, t, ", ".join(f"{m} {v:.4g}" for m, v in vals.items()))
    R = pd.DataFrame(rows)
    return write_results(summarize(R, T, info["tasks"]), R, ident=ident, provenance=provenance,
                         out_metrics=out_metrics, out_R=out_R)
