"""The metrics' noise floor: its measurement on a tiny world, the floor of a table column by hand, and tables that
never mark a method better when its gap to the best is inside the floor."""
import math

import pandas as pd
import pytest

from continual_bench.evaluation.noise_floor import COLUMNS, floor_of_column, write_noise_floor
from continual_bench.reporting.summary import summarize
from continual_bench.reporting.tables import write_tables

from test_t2i_eval_invariants import FakeJudge, FakeOracle


def test_floor_of_a_column_by_hand():
    f = pd.DataFrame(
        [{"benchmark": "b", "metric": "mmd", "source": "sampling_diff", "mean": 1.0, "std": 10.0, "n": 9, "set_size": 32},
         {"benchmark": "b", "metric": "mmd", "source": "real_diff", "mean": 0.0, "std": 50.0, "n": 9, "set_size": 16},
         {"benchmark": "b", "metric": "clip", "source": "real_diff", "mean": 0.0, "std": 0.02, "n": 9, "set_size": 16}])
    # T = 10 tasks, 3 seeds; the seed-vs-seed source wins over the real one
    assert floor_of_column(f, "b", "P_mmd", 10, 3) == pytest.approx(2 * 10 / math.sqrt(30))
    assert floor_of_column(f, "b", "A_mmd", 10, 3) == pytest.approx(2 * 10 / math.sqrt(30))
    assert floor_of_column(f, "b", "F_mmd", 10, 3) == pytest.approx(2 * math.sqrt(2) * 10 / math.sqrt(27))
    assert floor_of_column(f, "b", "Frel_mmd", 10, 3) == pytest.approx(2 * math.sqrt(2) * 10 / math.sqrt(3))
    assert floor_of_column(f, "b", "F_clip", 10, 3) == pytest.approx(2 * math.sqrt(2) * 0.02 / math.sqrt(27))
    assert floor_of_column(f, "b", "F_oracle", 10, 3) is None  # not measured
    assert floor_of_column(f, "b", "takeover", 10, 3) is None and floor_of_column(f, "other", "F_mmd", 10, 3) is None
    assert floor_of_column(None, "b", "F_mmd", 10, 3) is None


def _summary(values):
    rows = [dict(track="t2i", benchmark="b", n_tasks=10, method=m, seed=s, metric="F_mmd", value=v)
            for m, vs in values.items() for s, v in enumerate(vs)]
    per_seed = pd.DataFrame(rows)
    return summarize(per_seed), per_seed


def test_tables_bold_every_mean_inside_the_floor(tmp_path):
    summary, per_seed = _summary({"a": [100.0, 101.0, 99.0], "b": [130.0, 131.0, 129.0], "c": [400.0, 401.0, 399.0]})
    # without a floor: a alone is best (lower is better), b and c significantly worse
    write_tables(summary, tmp_path / "plain", per_seed_df=per_seed)
    tex = (tmp_path / "plain" / "b_T10.tex").read_text()
    assert tex.count("textbf") == 1 and "Noise floor" not in tex
    # F floor = 2 sqrt(2) s / sqrt(27): s = 60 gives 32.7 > the 30 gap between a and b, < the 300 gap to c
    floor = pd.DataFrame([{"benchmark": "b", "metric": "mmd", "source": "sampling_diff", "mean": 0.0, "std": 60.0,
                           "n": 9, "set_size": 32}])
    write_tables(summary, tmp_path / "floor", per_seed_df=per_seed, noise_floor=floor)
    tex = (tmp_path / "floor" / "b_T10.tex").read_text()
    lines = {ln.split("&")[0].strip(): ln for ln in tex.splitlines() if "&" in ln}
    assert "textbf" in lines["a"] and "textbf" in lines["b"] and "textbf" not in lines["c"]
    assert "Noise floor" in tex and "F\\_mmd 33" in tex
    assert "F_mmd 33" in (tmp_path / "floor" / "b_T10.html").read_text()
    csv = pd.read_csv(tmp_path / "floor" / "b_T10.csv").set_index("method")
    assert csv.at["noise floor", "F_mmd"] == pytest.approx(2 * math.sqrt(2) * 60 / math.sqrt(27))


def test_noise_floor_measured_on_a_tiny_world(tiny_world, tiny_pipeline, tmp_path):
    from continual_bench.backbones.model import T2IModel
    from continual_bench.data.datasets import PreparedDataset

    concepts = PreparedDataset(tiny_world).concepts()
    out = tmp_path / "floor.csv"
    table = write_noise_floor(data_dir=tiny_world, judge=FakeJudge(), oracle=FakeOracle(concepts + ["generic"]),
                              benchmark="toy_faces", out=out, model=T2IModel.from_pretrained(tiny_pipeline),
                              n_samples=3, steps=2, guidance=1.5, max_concepts=3, repeats=2, class_word="person")
    back = pd.read_csv(out)
    assert list(back.columns) == COLUMNS and len(back) == len(table)
    assert set(back.source) == {"real_halves", "real_diff", "sampling_diff"}
    assert set(back.metric) == {"mmd", "clip", "clip_t", "oracle"}
    real = back[back.source == "real_diff"].set_index("metric")
    samp = back[back.source == "sampling_diff"].set_index("metric")
    assert (real.n == 3 * 2).all() and (samp.n == 3).all() and (samp.set_size == 3).all()
    assert real.loc["mmd", "std"] > 0 and math.isfinite(samp.loc["clip", "std"])
    # deterministic: the same call writes the same file
    write_noise_floor(data_dir=tiny_world, judge=FakeJudge(), oracle=FakeOracle(concepts + ["generic"]),
                      benchmark="toy_faces", out=tmp_path / "again.csv", model=T2IModel.from_pretrained(tiny_pipeline),
                      n_samples=3, steps=2, guidance=1.5, max_concepts=3, repeats=2, class_word="person")
    assert (tmp_path / "again.csv").read_text() == out.read_text()
