import json

import torch

from continual_bench.evaluation.judge import load_judge, train_toy_judge
from continual_bench.evaluation.oracle import Oracle, train_oracle


def test_judge_trains_saves_and_loads_as_open_clip_local_dir(tiny_world, tmp_path):
    stats = train_toy_judge([tiny_world], tmp_path / "judge", steps=3, batch_size=8)
    cfg = json.loads((tmp_path / "judge" / "open_clip_config.json").read_text())
    assert "model_cfg" in cfg and (tmp_path / "judge" / "open_clip_model.safetensors").is_file()
    assert stats["steps"] == 3
    judge = load_judge(tmp_path / "judge")
    x = torch.rand(5, 3, 32, 32)
    f = judge.image_features(x)
    assert f.shape == (5, cfg["model_cfg"]["embed_dim"])
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(judge.image_features(torch.nn.functional.interpolate(x, size=64)), f, atol=0.5)
    t = judge.text_features(["a photo of a person", "a photo of a waterfall"])
    assert t.shape == (2, cfg["model_cfg"]["embed_dim"])


def test_oracle_learns_the_concepts(tiny_world, tmp_path):
    stats = train_oracle(tiny_world, tmp_path / "oracle", epochs=25, n_generic=12, batch_size=8)
    oracle = Oracle.load(tmp_path / "oracle")
    assert oracle.classes[0] == "generic" and len(oracle.classes) == 5
    from continual_bench.data.datasets import PreparedDataset

    ds = PreparedDataset(tiny_world)
    preds = oracle.predict(ds.images("concept_01", "train"))
    assert sum(p == "concept_01" for p in preds) >= 4  # of 6: a working classifier, not chance (1/5)
    assert 0 <= stats["val_acc"] <= 1
