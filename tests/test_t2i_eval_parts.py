"""evaluate_run's pieces one by one: reference features, per-sample scoring, the takeover rule, aggregation, writing."""
import numpy as np
import pandas as pd
import pytest

from continual_bench.data.datasets import PreparedDataset
from continual_bench.evaluation import metrics as M
from continual_bench.evaluation import t2i_eval as E
from continual_bench.evaluation.oracle import GENERIC
from test_t2i_eval_invariants import FakeJudge, FakeOracle


class CountingJudge(FakeJudge):
    def __init__(self):
        super().__init__()
        self.image_calls, self.texts = [], []

    def image_features(self, x, normalize=False):
        self.image_calls.append(len(x))
        return super().image_features(x, normalize)

    def text_features(self, texts):
        self.texts += texts
        return super().text_features(texts)


class NoGeneric:
    """A dataset without generic-class images (the generic prompt is then scored against every concept's)."""

    def __init__(self, ds):
        self.ds = ds

    def records(self, concept=None, split=None):
        return [] if concept == GENERIC else self.ds.records(concept=concept, split=split)


def _images(seed, n=4):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_takeover_is_measured_on_earlier_concepts_and_the_generic_prompt_at_both_ends():
    T = 3
    counted = {(t, k) for t in range(T + 1) for k in range(T + 1) if E.counts_for_takeover(t, k, T)}
    assert counted == {(3, 0), (3, 1), (3, 2), (0, 0), (0, 1), (0, 2), (0, 3)}
    assert not E.counts_for_takeover(3, 3, T) and not E.counts_for_takeover(2, 1, T)  # (T, T): the last one itself


def test_reference_features_are_computed_once_per_concept(tiny_world):
    ds = PreparedDataset(tiny_world)
    seq = ds.concepts()[:2]
    judge = CountingJudge()
    refs = E.ReferenceFeatures(ds, seq, "person", judge)
    feats, kid, text = refs.of(seq[0])
    assert kid is feats  # no KID extractor: KID on the judge's image features
    assert refs.of(seq[0])[0] is feats and len(judge.image_calls) == 1
    n_eval = len([r for r in ds.records(concept=seq[0]) if r.split == "eval"])
    assert judge.image_calls == [n_eval] and judge.texts == [E.concept_text(ds, seq[0], "person")]
    refs.of(GENERIC)
    assert judge.texts[-1] == "a photo of a person" and judge.image_calls[-1] == len(ds.records(concept=GENERIC))
    refs.template(seq[0], "{prompt} on the beach")
    refs.template(seq[0], "{prompt} on the beach")
    assert judge.texts[-1] == E.concept_text(ds, seq[0], "person") + " on the beach" and len(judge.texts) == 3
    # without generic images the generic prompt's references are every concept's real images
    no_gen = E.ReferenceFeatures(NoGeneric(ds), seq, "person", judge)
    assert len(no_gen.real_images(GENERIC)) == sum(len(E.real_reference(ds, c)) for c in seq)


def test_reference_features_use_the_judges_kid_extractor(tiny_world):
    class KidJudge(FakeJudge):
        kid_extractor = object()

        def kid_features(self, x):
            return x.reshape(len(x), -1)[:, :5]

    ds = PreparedDataset(tiny_world)
    feats, kid, _ = E.ReferenceFeatures(ds, ds.concepts()[:1], "person", KidJudge()).of(ds.concepts()[0])
    assert kid.shape[1] == 5 and feats.shape[1] == 16


def test_score_samples_values_and_keys(tiny_world):
    ds = PreparedDataset(tiny_world)
    seq = ds.concepts()[:2]
    judge = FakeJudge()
    refs = E.ReferenceFeatures(ds, seq, "person", judge)
    imgs = _images(1)
    vals = E.score_samples(imgs, seq[0], refs)
    real_feats, _, text = refs.of(seq[0])
    fake = judge.image_features(E._to_tensor(imgs))
    assert list(vals) == ["mmd", "clip", "clip_t"]
    assert vals["clip"] == M.clip_image_alignment(real_feats, fake)
    assert vals["clip_t"] == M.clip_text_alignment(text, fake)
    assert vals["mmd"] == M.kid(real_feats, fake, seed=E.stable_seed("kid", seq[0], "concept"))
    oracle = FakeOracle(seq + [GENERIC])
    preds = oracle.predict(E._to_tensor(imgs))
    vals = E.score_samples(imgs, seq[0], refs, oracle=oracle, takeover_of=seq[1])
    assert vals["oracle"] == M.oracle_accuracy(preds, seq[0]) and vals["takeover"] == M.oracle_accuracy(preds, seq[1])
    generic = E.score_samples(imgs, GENERIC, refs, oracle=oracle, held_out=[(_images(2), "{prompt} at night")])
    assert list(generic) == ["mmd", "clip", "clip_t"]  # no oracle accuracy, no takeover; held-out prompts ignored
    assert generic["mmd"] != vals["mmd"]  # scored against the generic references, with their own KID seed


def test_held_out_clip_t_is_weighted_by_sample_count(tiny_world):
    ds = PreparedDataset(tiny_world)
    seq = ds.concepts()[:1]
    judge = FakeJudge()
    refs = E.ReferenceFeatures(ds, seq, "person", judge)
    parts = [(_images(3, n=3), "{prompt} on the beach"), (_images(4, n=1), "a painting of {prompt}")]
    one = [M.clip_text_alignment(refs.template(seq[0], tpl), judge.image_features(E._to_tensor(imgs)))
           for imgs, tpl in parts]
    assert E.held_out_clip_t(parts, seq[0], refs) == pytest.approx((3 * one[0] + one[1]) / 4)
    vals = E.score_samples(_images(5), seq[0], refs, held_out=parts)
    assert vals["clip_t"] == E.held_out_clip_t(parts, seq[0], refs)


def _R(rows):
    return pd.DataFrame([{"after_task": t, "concept_index": k, "concept": f"c{k}", "metric": m, "value": v}
                         for t, k, m, v in rows])


def test_summarize_by_hand():
    T = 2
    rows = [(1, 1, "clip", 0.9), (2, 2, "clip", 0.8), (2, 1, "clip", 0.6),  # P = 0.85, A = 0.7, F = 0.3
            (1, 1, "mmd", 10.0), (2, 2, "mmd", 20.0), (2, 1, "mmd", 30.0),  # lower is better: F = 30 - 10
            (0, 0, "clip", 0.5), (2, 0, "clip", 0.4), (0, 0, "mmd", 1.0), (2, 0, "mmd", 4.0),
            (2, 1, "takeover", 0.25), (0, 0, "takeover", 0.1), (2, 0, "takeover", 0.3)]
    s = E.summarize(_R(rows), T, [{"N_train": 4, "N_store": 4}, {"N_train": 6, "N_store": 10}])
    assert list(s) == ["P_mmd", "A_mmd", "F_mmd", "P_clip", "A_clip", "F_clip", "Frel_mmd", "Frel_clip",
                       "takeover", "takeover_base", "takeover_generic", "N_train", "N_store"]
    assert s["P_clip"] == pytest.approx(0.85) and s["A_clip"] == pytest.approx(0.7) and s["F_clip"] == pytest.approx(0.3)
    assert s["F_mmd"] == 20.0 and s["Frel_mmd"] == 3.0 and s["Frel_clip"] == pytest.approx(0.1)
    assert (s["takeover"], s["takeover_base"], s["takeover_generic"]) == (0.25, 0.1, 0.3)
    assert s["N_train"] == 5.0 and s["N_store"] == 10.0
    # no generic rows, no takeover: only the concept aggregates and the counts
    s = E.summarize(_R(rows[:6]), T, [{"N_train": 1, "N_store": 1}] * 2)
    assert not any(k.startswith(("Frel", "takeover")) for k in s)


def test_write_results_columns_and_format(tmp_path):
    R = _R([(1, 1, "clip", 0.123456789)])
    ident = {"track": "t2i", "benchmark": "b", "n_tasks": 1, "method": "m", "seed": 0}
    out = E.write_results({"P_clip": 1 / 3}, R, ident=ident, provenance={"config_hash": "h", "seconds": 1.5},
                          out_metrics=tmp_path / "metrics.csv", out_R=tmp_path / "R.csv")
    assert list(out.columns) == ["track", "benchmark", "n_tasks", "method", "seed", "metric", "value", "config_hash",
                                 "seconds"]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "t2i,b,1,m,0,P_clip,0.333333,h,1.5"
    r = pd.read_csv(tmp_path / "R.csv")
    assert list(r.columns) == ["after_task", "concept_index", "concept", "metric", "value", *ident, "config_hash",
                               "seconds"]
    assert r.value.tolist() == [0.123457] and r.seed.tolist() == [0]
