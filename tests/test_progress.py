"""Long work shows progress: utils.progress (tqdm; CONTINUAL_BENCH_NO_TQDM=1 hides it), and evaluation's bar and log
line per sample set evaluated. (Downloads and the GLDv2 crawl: tests/test_fetch.py, tests/test_paper_profile.py.)"""
import json

import numpy as np
import torch

from continual_bench.data.datasets import PreparedDataset
from continual_bench.evaluation.t2i_eval import evaluate_run
from continual_bench.utils import progress


def test_progress_is_a_tqdm_bar_that_the_environment_can_hide(monkeypatch, capsys):
    monkeypatch.delenv("CONTINUAL_BENCH_NO_TQDM", raising=False)
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    assert "work: 100%" in capsys.readouterr().err
    monkeypatch.setenv("CONTINUAL_BENCH_NO_TQDM", "1")
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


IDENT = {"track": "t2i", "benchmark": "toy_faces", "n_tasks": 2, "method": "m", "seed": 0}


class _Judge:
    kid_extractor = None

    def image_features(self, x, normalize=False):
        return x.reshape(len(x), 3, -1).mean(-1)

    def text_features(self, texts):
        return torch.ones(1, 3)


def test_evaluation_shows_a_bar_and_logs_a_line_per_sample_set(tmp_path, tiny_world, monkeypatch, caplog, capsys):
    monkeypatch.delenv("CONTINUAL_BENCH_NO_TQDM", raising=False)
    caplog.set_level("INFO", logger="continual_bench")
    seq = PreparedDataset(tiny_world).concepts()[:2]
    (tmp_path / "train.json").write_text(json.dumps({"sequence": seq, "tasks": [{"N_train": 1, "N_store": 1}] * 2}))
    rng = np.random.default_rng(0)
    keys = ["after1_concept1", "after2_concept1", "after2_concept2"]
    np.savez(tmp_path / "samples.npz", **{k: rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8) for k in keys})
    evaluate_run(train_json=tmp_path / "train.json", samples_npz=tmp_path / "samples.npz", data_dir=tiny_world,
                 judge=_Judge(), ident=IDENT, provenance={}, out_metrics=tmp_path / "m.csv",
                 out_R=tmp_path / "R.csv")
    lines = [m for m in caplog.messages if m.startswith("evaluated ")]
    assert [ln.split(":")[0] for ln in lines] == [f"evaluated {seq[0]} after task 1", f"evaluated {seq[0]} after task 2",
                                                 f"evaluated {seq[1]} after task 2"]
    assert all(ln.split(": ", 1)[1].startswith("mmd ") and ", clip " in ln and ", clip_t " in ln for ln in lines)
    err = capsys.readouterr().err
    assert "evaluate: 100%" in err and "3/3" in err
