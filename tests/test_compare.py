"""continual-bench compare: identical / within noise / differs / missing on two hand-made result folders."""
import math

import numpy as np
import pandas as pd
import pytest

from continual_bench.cli import main
from continual_bench.reporting.compare import compare_runs


def _folder(path, cells, floor=None):
    path.mkdir()
    rows = [dict(track="t2i", benchmark="toy_faces", n_tasks=5, method=m, metric=k, mean=mean, std=std, n_seeds=3)
            for (m, k), (mean, std) in cells.items()]
    pd.DataFrame(rows).to_csv(path / "summary.csv", index=False)
    if floor is not None:
        pd.DataFrame([dict(benchmark="toy_faces", metric="mmd", source="sampling_diff", mean=0.0, std=floor, n=20,
                           set_size=32)]).to_csv(path / "noise_floor.csv", index=False)
    return path


REF = {("lora", "P_oracle"): (0.80, 0.05), ("lora", "F_oracle"): (0.70, 0.03), ("lora", "F_mmd"): (8000.0, 10.0),
       ("lora", "N_store"): (46400.0, 0.0), ("lora", "A_clip"): (0.50, 0.02)}


def test_compare_verdicts_and_exit_status(tmp_path, capsys):
    ref = _folder(tmp_path / "ref", REF, floor=300.0)
    same = _folder(tmp_path / "same", REF)
    assert main(["compare", str(same), str(ref)]) == 0
    assert "5 cells: 5 identical" in capsys.readouterr().out

    run = dict(REF)
    run["lora", "P_oracle"] = (0.82, 0.05)   # 0.02 < 2 * sqrt(2 * 0.05^2 / 3) = 0.082: within the seeds' noise
    run["lora", "F_mmd"] = (8150.0, 10.0)    # 150 >> 2 se (16) but inside the floor 2 sqrt(2) 300 / sqrt(4 * 3) = 245
    run["lora", "A_clip"] = (0.60, 0.02)     # 0.1 = 5 seed stds: differs
    del run["lora", "N_store"]               # missing in the run
    df = compare_runs(_folder(tmp_path / "run", run), ref).set_index("metric")
    assert df.at["P_oracle", "verdict"] == "within noise" and df.at["F_mmd", "verdict"] == "within noise"
    assert df.at["A_clip", "verdict"] == "differs" and abs(df.at["A_clip", "d_over_sd"] - 5.0) < 1e-9
    assert abs(df.at["F_mmd", "d_over_floor"] - 150 / (2 * 2 ** 0.5 * 300 / 12 ** 0.5)) < 1e-9
    assert df.at["N_store", "verdict"] == "missing" and df.at["F_oracle", "verdict"] == "identical"
    assert main(["compare", str(tmp_path / "run"), str(ref), "--out", str(tmp_path / "c.csv")]) == 1
    out = capsys.readouterr().out
    assert "differs       t2i/toy_faces/T5/lora/A_clip" in out and "missing" in out
    assert len(pd.read_csv(tmp_path / "c.csv")) == 5


def _runs(folder, weights: list[str | None]):
    """One hand-made metrics.csv per seed, with ``weights`` as given (None: a row written before the column)."""
    for seed, w in enumerate(weights):
        run = folder / "runs" / "toy_faces" / "T5" / "lora" / f"seed{seed}"
        run.mkdir(parents=True)
        row = dict(track="t2i", benchmark="toy_faces", n_tasks=5, method="lora", seed=seed, metric="P_oracle",
                   value=0.8, config_hash="abc", git_commit="def")
        if w is not None:
            row["weights"] = w
        pd.DataFrame([row]).to_csv(run / "metrics.csv", index=False)


def test_compare_says_whether_the_runs_used_the_same_models(tmp_path, capsys):
    rest = "judge=111111111111;oracle=222222222222"
    host_a, host_b = f"backbone=aaaaaaaaaaaa;{rest}", f"backbone=bbbbbbbbbbbb;{rest}"
    ref, same, other, old = (_folder(tmp_path / n, REF) for n in ("ref", "same", "other", "old"))
    _runs(ref, [host_a] * 3)
    _runs(same, [host_a] * 3)
    _runs(other, [host_b] * 3)
    _runs(old, [host_a, None, host_a])
    assert main(["compare", str(same), str(ref)]) == 0
    out = capsys.readouterr().out
    same_line = f"model weights: the same in both folders (run folder: {host_a} (3 runs); reference: {host_a}"
    assert out.startswith(same_line)
    fewer = _folder(tmp_path / "fewer", REF)
    _runs(fewer, [host_a])  # a folder with fewer runs, all on the reference's models
    main(["compare", str(fewer), str(ref)])
    assert capsys.readouterr().out.startswith("model weights: the same in both folders")
    main(["compare", str(other), str(ref)])
    out = capsys.readouterr().out
    assert out.startswith("model weights differ") and "backbone=bbbbbbbbbbbb" in out and "within noise" in out
    main(["compare", str(old), str(ref)])
    assert "unknown (1 runs)" in capsys.readouterr().out
    main(["compare", str(_folder(tmp_path / "bare", REF)), str(ref)])
    assert capsys.readouterr().out.startswith(f"model weights: no runs/**/metrics.csv in {tmp_path / 'bare'}")


def _cls_folder(path, acc, cells, n_test=100):
    """A one-seed classification folder: summary.csv ``cells`` and the run's acc_matrix.csv (T = 2)."""
    from continual_bench.evaluation.cls_metrics import write_cls_results

    path.mkdir()
    rows = [dict(track="cls", benchmark="toy_imagenet_r", n_tasks=2, method="ft", metric=k, mean=v, std=0.0,
                 n_seeds=1) for k, v in cells.items()]
    pd.DataFrame(rows).to_csv(path / "summary.csv", index=False)
    run = path / "runs" / "toy_imagenet_r" / "T2" / "ft" / "seed0"
    run.mkdir(parents=True)
    ident = dict(track="cls", benchmark="toy_imagenet_r", n_tasks=2, method="ft", seed=0)
    write_cls_results(np.array(acc), n_test=[n_test, n_test], n_train=1.0, n_store=1.0, ident=ident, provenance={},
                      out_metrics=run / "metrics.csv", out_acc=run / "acc_matrix.csv")
    return path


def test_one_seed_accuracies_are_judged_against_the_test_sets_sampling_noise(tmp_path, capsys):
    """One classification seed has no seed std: the floor is the test set's own (cls_metrics.sampling_sd)."""
    nan = float("nan")
    ref = _cls_folder(tmp_path / "ref", [[80.0, nan], [40.0, 70.0]],
                      {"A_N": 55.0, "P_N": 75.0, "F_N": 40.0, "N_train": 1.0})
    run = _cls_folder(tmp_path / "run", [[80.0, nan], [40.0, 80.0]],
                      {"A_N": 60.0, "P_N": 80.0, "F_N": 60.0, "N_train": 2.0})
    df = compare_runs(run, ref).set_index("metric")
    # A_N: var_ref = (40 * 60 + 70 * 30) / 100 / 4 = 11.25, var_run = (40 * 60 + 80 * 20) / 100 / 4 = 10
    assert df.at["A_N", "floor"] == pytest.approx(2 * math.sqrt(11.25 + 10))
    assert df.at["A_N", "verdict"] == "within noise" and df.at["A_N", "d_over_floor"] == pytest.approx(5 / 9.2195, 1e-4)
    assert df.at["P_N", "verdict"] == "within noise"  # 5 < 2 sqrt(9.25 + 8) = 8.31
    # F_N = acc[0][0] - acc[1][0]: var = (80 * 20 + 40 * 60) / 100 = 40 in each folder; 20 > 2 sqrt(80) = 17.9
    assert df.at["F_N", "floor"] == pytest.approx(2 * math.sqrt(80)) and df.at["F_N", "verdict"] == "differs"
    assert df.at["N_train", "verdict"] == "differs" and math.isnan(df.at["N_train", "floor"])
    bare = tmp_path / "bare"  # a folder without its runs borrows the other folder's sampling sd
    bare.mkdir()
    (run / "summary.csv").rename(bare / "summary.csv")
    assert compare_runs(bare, ref).set_index("metric").at["A_N", "floor"] == pytest.approx(2 * math.sqrt(2 * 11.25))
    assert main(["compare", str(bare), str(ref)]) == 1
    assert "within noise  cls/toy_imagenet_r/T2/ft/A_N" in capsys.readouterr().out
