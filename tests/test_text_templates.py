"""Held-out prompts for CLIP text alignment: generated as extra sample sets, scored against their own text."""
import json

import numpy as np
import pytest
import torch

from continual_bench.data.datasets import PreparedDataset
from continual_bench.evaluation import t2i_eval as E
from continual_bench.methods.base import Task
from continual_bench.utils import UserError

COLOURS = {" in RED": [1.0, 0.0, 0.0], " in BLUE": [0.0, 0.0, 1.0]}  # suffixes no toy caption has


class ColourJudge:
    """Image feature = mean RGB; a text's feature = the colour it names, green for any other text."""

    def __init__(self):
        self.texts = []

    def image_features(self, x, normalize=False):
        return x.mean(dim=(2, 3)).double()

    def text_features(self, texts):
        self.texts += texts
        return torch.tensor([next((v for c, v in COLOURS.items() if t.endswith(c)), [0.0, 1.0, 0.0]) for t in texts])


def _solid(n, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (n, 8, 8, 3)).copy()


def test_clip_t_uses_held_out_samples_weighted_by_count(tiny_world, tmp_path):
    seq = PreparedDataset(tiny_world).concepts()[:2]
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"sequence": seq, "class_word": "person",
                                 "tasks": [{"N_train": 3, "N_store": 3}, {"N_train": 3, "N_store": 6}]}))
    rng = np.random.default_rng(0)
    samples = {E.sample_key(t, k): rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
               for t, k in [(1, 1), (2, 2), (2, 1), (0, 0), (2, 0)]}
    for t, k in [(1, 1), (2, 2), (2, 1)]:
        samples[E.text_key(t, k, 0)] = _solid(3, (255, 0, 0))  # red images for "... in RED": cosine 1
        samples[E.text_key(t, k, 1)] = _solid(1, (0, 0, 255))  # blue images for "... in GREEN": cosine 0
    samples[E.TEXT_TEMPLATES_KEY] = np.array(["{prompt} in RED", "{prompt} in GREEN"])
    np.savez(tmp_path / "samples.npz", **samples)
    judge = ColourJudge()
    out = E.evaluate_run(train_json=train, samples_npz=tmp_path / "samples.npz", data_dir=tiny_world, judge=judge,
                         ident={"track": "t2i", "benchmark": "b", "n_tasks": 2, "method": "m", "seed": 0},
                         provenance={}, out_metrics=tmp_path / "m.csv", out_R=tmp_path / "R.csv")
    import pandas as pd

    R = pd.read_csv(tmp_path / "R.csv")
    clip_t = R[(R.metric == "clip_t") & (R.concept_index > 0)].value
    assert np.allclose(clip_t, 2.5 * 3 / 4)  # (3 x 2.5 + 1 x 0) / 4 samples
    generic = R[(R.metric == "clip_t") & (R.concept_index == 0)].value
    assert not np.allclose(generic, 1.875)  # the generic prompt keeps its own samples
    # the templates are filled with the concept's class text, never with a concept token
    filled = [t for t in judge.texts if t.endswith(" in RED")]
    assert filled and all("<v" not in t and t.startswith("a photo of a person") for t in filled)
    # KID and image alignment come from the training prompt's samples: as without held-out samples
    plain = {k: v for k, v in samples.items() if "_text" not in k and k != E.TEXT_TEMPLATES_KEY}
    np.savez(tmp_path / "plain.npz", **plain)
    E.evaluate_run(train_json=train, samples_npz=tmp_path / "plain.npz", data_dir=tiny_world, judge=ColourJudge(),
                   ident={"track": "t2i", "benchmark": "b", "n_tasks": 2, "method": "m", "seed": 0},
                   provenance={}, out_metrics=tmp_path / "m2.csv", out_R=tmp_path / "R2.csv")
    R2 = pd.read_csv(tmp_path / "R2.csv")
    for metric in ("mmd", "clip"):
        assert np.allclose(R[R.metric == metric].value, R2[R2.metric == metric].value)
    assert not np.allclose(R2[(R2.metric == "clip_t") & (R2.concept_index > 0)].value, 1.875)
    assert out.value.notna().all()


class _Method:
    def __init__(self, calls):
        self.calls = calls

    def prompt(self, task):
        return task.prompt

    def generate(self, task, n, *, seed, **kw):
        return self.generate_prompt(self.prompt(task), n, seed=seed, **kw)

    def generate_prompt(self, prompt, n, *, seed, **kw):
        self.calls.append((prompt, n, seed))
        return np.zeros((n, 4, 4, 3), np.uint8)


class _Spec:
    def __init__(self, root, calls):
        self.n_tasks, self.seed, self.root, self.calls = 1, 0, root, calls
        self.tasks = [Task(index=1, concept="c", token="<v1>", prompt="a photo of <v1>", images=torch.empty(0),
                           class_word="person")]

    def checkpoint_dir(self, _):
        (self.root / "task_001").mkdir(parents=True, exist_ok=True)
        (self.root / "task_001" / "meta.json").write_text("{}")
        return self.root

    def restore(self, ckpt, t):
        return _Method(self.calls)


def test_generate_splits_n_samples_over_templates(tmp_path):
    calls = []
    out = E.generate_run(_Spec(tmp_path / "ck", calls), tmp_path, tmp_path / "s.npz", n_samples=5,
                         text_templates=["{prompt} on the beach", "{prompt} in the snow"])
    assert len(out[E.text_key(1, 1, 0)]) == 3 and len(out[E.text_key(1, 1, 1)]) == 2
    assert len(out[E.sample_key(1, 1)]) == 5  # the training prompt's set is untouched
    prompts = [p for p, _, _ in calls]
    assert "a photo of <v1> on the beach" in prompts and "a photo of <v1> in the snow" in prompts
    assert len({s for p, _, s in calls if "<v1>" in p}) == 3  # held-out sets have their own seeds
    assert list(np.load(tmp_path / "s.npz")[E.TEXT_TEMPLATES_KEY]) == ["{prompt} on the beach", "{prompt} in the snow"]
    calls.clear()
    plain = E.generate_run(_Spec(tmp_path / "ck", calls), tmp_path, tmp_path / "p.npz", n_samples=5)
    assert sorted(plain) == sorted(k for k in out if "_text" not in k and k != E.TEXT_TEMPLATES_KEY)


@pytest.mark.parametrize("bad", ["on the beach", "{prompt} {x}", 3])
def test_bad_template_is_named(bad):
    with pytest.raises(UserError, match="text_templates"):
        E.check_templates([bad])
