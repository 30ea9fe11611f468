"""`continual-bench bench` (issue 20): every comparison runs both ways on the toy architectures, the ratios and the
cost table are the arithmetic they claim, and bad input is refused."""
import numpy as np
import pandas as pd
import pytest

from continual_bench import bench as B
from continual_bench.methods.registry import get_method
from continual_bench.utils import UserError


def test_median_rate_skips_warmup_and_counts_items():
    # step starts at 0, 1, 3, 4, 6 s: the warm-up gap (1 s) is left out, the median of 2, 1, 2 s is 2 s
    assert B._median_rate([0.0, 1.0, 3.0, 4.0, 6.0], warmup=1, items=2) == pytest.approx(1.0)
    with pytest.raises(UserError, match="too few steps"):
        B._median_rate([0.0, 1.0], warmup=1, items=1)


def test_every_case_runs_both_ways_on_the_toy_architectures(tmp_path):
    o = B.BenchOptions(device="cpu", t2i_arch="toy", cls_arch="toy", steps=1, cls_steps=1, n_images=2)
    df = B.bench(o, list(B.CASES), "testhost", tmp_path / "b.csv", runner=B.run_case)
    assert (tmp_path / "b.csv").is_file() and len(pd.read_csv(tmp_path / "b.csv")) == 8
    assert set(zip(df.case, df.way)) == {(c, w) for c in B.CASES for w in B.WAYS}
    assert (df.rate > 0).all() and (df.resolution[df.case.str.startswith("t2i")] == 32).all()
    ours, ref = df[df.way == "ours"].set_index("case"), df[df.way == "reference"].set_index("case")
    assert (ours.ratio - ours.items_per_s / ref.items_per_s).abs().max() < 1e-3
    assert ref.ratio.isna().all()
    # the reference encodes the images with the VAE every step; ours reads cached latents
    assert ref.loc["t2i_train", "model_gflops_per_item"] > ours.loc["t2i_train", "model_gflops_per_item"]
    # CODA-P's form runs the query pass with every batch; ours reads the precomputed queries
    assert ref.loc["cls_eval", "model_gflops_per_item"] > 1.5 * ours.loc["cls_eval", "model_gflops_per_item"]
    assert {"host", "device_name", "git_commit", "packages", "peak_memory_gb", "mfu"} <= set(df.columns)


def test_an_isolated_case_runs_with_the_threads_the_row_names():
    """A case's own process starts with torch's default threads (every core): the row would say 1 thread while the
    case used them all. The options carry the threads into it."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o = B.BenchOptions(device="cpu", cls_arch="toy", cls_steps=1, cls_batch=2).resolved()
        res = B.run_isolated("cls_eval", "ours", o)
    finally:
        torch.set_num_threads(before)
    assert o.threads == 1 and res["threads"] == 1 and B.device_name("cpu", o.threads).endswith("CPU, 1 thread")
    assert B.device_name("cpu", 2).endswith("CPU, 2 threads")


def test_unknown_case_and_bad_resolution_are_refused():
    o = B.BenchOptions(device="cpu", t2i_arch="toy")
    with pytest.raises(UserError, match=r"unknown case\(s\) \['t2i_fast'\]"):
        B.bench(o, ["t2i_fast"], "h", None, runner=B.run_case)
    with pytest.raises(UserError, match="multiple of 64"):
        B.sd15_pipeline(100)
    with pytest.raises(UserError, match="at least 1 warm-up"):
        B.run_case("cls_eval", "ours", B.BenchOptions(device="cpu", cls_arch="toy", warmup=0).resolved())


def test_cost_table_is_steps_and_images_over_the_measured_rates():
    df = pd.DataFrame([
        {"case": "t2i_train", "way": "ours", "rate": 2.0, "items_per_s": 4.0, "sample_steps": None, "peak_memory_gb": 9.0},
        {"case": "t2i_sample", "way": "ours", "rate": 0.5, "items_per_s": 0.5, "sample_steps": 50, "peak_memory_gb": 5.0},
        {"case": "cls_train", "way": "ours", "rate": 100.0, "items_per_s": 100.0, "sample_steps": None,
         "peak_memory_gb": 7.0},
        {"case": "cls_eval", "way": "ours", "rate": 500.0, "items_per_s": 500.0, "sample_steps": None,
         "peak_memory_gb": 3.0},
    ])
    cfg = {"n_tasks": [10], "seeds": [0, 1, 2], "benchmarks": ["faces"], "methods": ["a", "b"],
           "benchmark_settings": {"faces": {"steps": 720}}, "cls_methods": ["c"], "cls_train": {"epochs": 5},
           "evaluation": {"n_samples": 10, "sample_steps": 200, "text_templates": ["{prompt} x"]}}
    costs = B.cost_table(df, cfg).set_index("track")
    # 10 tasks x 720 steps at 2 steps/s = 1 h; (19 pairs x 10 x 2 + 2 x 10) = 400 images at 0.5/s, x 200/50 steps
    assert B.t2i_images_per_run(10, 10, 1) == 400
    assert costs.loc["t2i", "train_h_per_run"] == pytest.approx(1.0)
    assert costs.loc["t2i", "generate_h_per_run"] == pytest.approx(400 / 0.5 * 4 / 3600)
    assert costs.loc["t2i", "runs"] == 6 and costs.loc["t2i", "total_h"] == pytest.approx(6 * (1 + 3200 / 3600))
    # 5 epochs x 24,000 images at 100/s; 6,000 test images x (10 + 1) / 2 at 500/s
    assert costs.loc["cls", "train_h_per_run"] == pytest.approx(5 * 24000 / 100 / 3600)
    assert costs.loc["cls", "generate_h_per_run"] == pytest.approx(6000 * 5.5 / 500 / 3600)


def test_readme_cost_table_is_the_one_generated_from_the_committed_measurement():
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"<!-- generated: (results/bench/\S+\.costs\.md) -->\n(.*?)<!-- end of \1 -->", readme, re.S)
    assert blocks, "README: no generated bench table"
    for path, text in blocks:
        csv = root / path.replace(".costs.md", ".csv")
        generated = B.cost_markdown(pd.read_csv(csv), yaml.safe_load((root / "config/paper.yaml").read_text()))
        assert text == generated == (root / path).read_text(), f"README's table differs from {path}: rerun bench"


def test_cost_steps_come_from_benchmark_settings_then_method_settings_then_the_default():
    from continual_bench.methods.registry import get_method

    cfg = {"benchmark_settings": {"a": {"steps": 7}}, "method_settings": {"c_lora": {"steps": 9}}}
    assert B._t2i_steps(cfg, "a") == 7 and B._t2i_steps(cfg, "b") == 9
    assert B._t2i_steps({}, "b") == get_method("t2i", "c_lora").Settings().steps


def test_cost_table_without_text_to_image_rows_and_a_missing_cost_config(tmp_path, capsys):
    from continual_bench import cli

    df = pd.DataFrame([{"case": c, "way": w, "rate": 10.0, "items_per_s": 10.0, "sample_steps": None,
                        "peak_memory_gb": 1.0, "ratio": 1.5 if w == "ours" else None, "device_name": "cpu",
                        "host": "h", "date": "d"} for c in ("cls_train", "cls_eval") for w in B.WAYS])
    md = B.cost_markdown(df, {"n_tasks": [5], "seeds": [0], "cls_methods": ["coda_p"]})
    assert "text-to-image" not in md and "| cls | ImageNet-R, 5 tasks" in md
    # refused before anything is measured, with a one-line error naming the file
    assert cli.main(["bench", "--cost-config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "b.csv")]) == 2
    assert "bench --cost-config" in capsys.readouterr().err and not (tmp_path / "b.csv").exists()


def test_each_method_runs_through_the_engine_and_its_work_outside_the_steps_is_counted():
    o = B.BenchOptions(device="cpu", t2i_arch="toy", steps=1).resolved()
    def run(m, st, tasks=3):
        return B.run_case("t2i_method", "ours", B.replace(o, method=m, method_settings=st, method_tasks=tasks))

    # DreamBooth: 3 class images x 4 DDIM steps x 2 (guidance batches both halves), from the base model, once
    db = run("dreambooth", {"n_class_images": 3, "class_sample_steps": 4, "class_guidance": 2.0, "batch_size": 2}, 2)
    assert db["outside_nograd"] == [24, 0] and db["outside_grad"] == [0, 0]
    assert db["rate"] > 0 and db["unit"] == "steps/s" and db["items"] == 2
    # generative replay: 2 images of every past concept, 3 steps, no guidance (one UNet pass per step)
    gr = run("generative_replay", {"n_replay": 2, "replay_steps": 3, "replay_guidance": 1.0})
    assert gr["outside_nograd"] == [0, 6, 12]
    # EWC: the Fisher's single-sample gradients run (with gradients) after every task
    ewc = run("custom_diffusion_ewc", {"fisher_samples": 5}, 2)
    assert ewc["outside_grad"] == [5, 5] and ewc["outside_nograd"] == [0, 0]
    # one adapter kept per concept: every task's state grows by the same bytes; DreamBooth keeps the whole UNet
    lb = run("lora_per_concept", {})["state_bytes"]
    assert lb[1] - lb[0] == pytest.approx(lb[2] - lb[1], rel=0.01) and lb[0] > 0
    assert db["state_bytes"][0] > 50 * lb[0]
    with pytest.raises(UserError, match="unknown"):
        B.bench(o, [], "h", None, runner=B.run_case, methods={"no_such_method": {}})


def test_per_task_counts_are_carried_linearly_and_never_below_zero():
    assert B.per_task([200, 0, 0], 5) == [200, 0, 0, 0, 0]
    assert B.per_task([0, 480, 960], 5) == [0, 480, 960, 1440, 1920]
    assert B.per_task([10, 5, 1], 5) == [10, 5, 1, 0, 0]
    assert B.per_task([7], 3) == [7, 7, 7] and B.per_task([1, 2, 3], 2) == [1, 2]


def test_method_cost_table_is_each_methods_steps_sampling_and_states_over_the_measured_rates():
    df = pd.DataFrame([
        {"case": "t2i_sample", "way": "ours", "rate": 2.0, "sample_steps": 4, "guidance": 6.0, "resolution": 64},
        {"case": "t2i_method", "way": "ours", "method": "m", "rate": 0.5, "batch": 2, "peak_memory_gb": 9.0,
         "outside_nograd": "160;0", "outside_grad": "4;4", "state_bytes": "1000000000;2000000000", "resolution": 64},
    ])
    cfg = {"n_tasks": [3], "seeds": [0, 1], "benchmarks": ["faces"], "methods": ["m", "not_measured"],
           "method_settings": {"m": {"steps": 10}}, "evaluation": {"n_samples": 1, "sample_steps": 8}}
    mc = B.method_cost_table(df, cfg)
    assert list(mc.method) == ["m"]
    r = mc.iloc[0]
    # 3 tasks x 10 steps at 0.5 steps/s, + 3 x 4 gradient passes at 0.5 x 2 images/s: 60 + 12 s
    assert r.train_h_per_run == pytest.approx(72 / 3600)
    # 160 UNet evaluations at 2 images/s x 4 steps x 2 (guidance) = 16 evaluations/s
    assert r.sample_in_training_h_per_run == pytest.approx(10 / 3600)
    n_img = B.t2i_images_per_run(3, 1, 0)
    assert r.evaluation_h_per_run == pytest.approx(n_img / 2.0 * (8 / 4) / 3600)
    assert r.checkpoints_gb_per_run == pytest.approx(1 + 2 + 3) and r.runs == 2
    assert r.total_h == pytest.approx(2 * (82 / 3600 + r.evaluation_h_per_run))
    md = B.method_cost_markdown(df, cfg)
    assert "| faces | 3 x 10 | m | 0.02 | 0.00 |" in md and "12 (all runs)" in md
    assert B.method_cost_table(df[df.case == "t2i_sample"], cfg).empty


def test_bench_methods_config_needs_a_cost_config(tmp_path, capsys):
    from continual_bench import cli

    assert cli.main(["bench", "--methods", "config", "--out", str(tmp_path / "b.csv")]) == 2
    assert "--methods config" in capsys.readouterr().err and not (tmp_path / "b.csv").exists()


def test_each_classification_method_runs_the_engines_way_and_its_passes_are_timed():
    o = B.BenchOptions(device="cpu", cls_arch="toy", cls_steps=1, cls_batch=4).resolved()
    def run(m, st=None, tasks=2):
        res = B.run_case("cls_method", "ours", B.replace(o, method=m, method_settings=st or {}, method_tasks=tasks))
        return res, B.case_row("cls_method", "ours", B.replace(o, method=m), res, "cpu")

    # SimpleCIL trains nothing (no step: its rate is NaN, not 0 images/s) and averages features in after_training
    sc, row = run("simplecil")
    assert sc["trains"] == [0, 0] and sc["hook_passes"] == 1 and sc["rate"] == 0.0 and np.isnan(row["rate"])
    assert sc["eval_images_per_s"] > 0 and row["trains"] == "0;0" and row["method"] == "simplecil"
    # RanPAC tunes its PETL module on the first task only, then fits its ridge head after every task
    rp, _ = run("ranpac", {"rp_dim": 32, "ridge": 1.0e-3})
    assert rp["trains"] == [1, 0] and rp["rate"] > 0 and all(h > 0 for h in rp["hook_s"])
    # InfLoRA: a pass before training (the input subspace) and one after (its memory); C-LoRA none
    inf, _ = run("inflora", tasks=1)
    assert inf["hook_passes"] == 2 and B.hook_passes(get_method("cls", "c_lora")) == 0
    # C-LoRA keeps every task's adapter: the kept state grows by the same bytes each task
    cl, _ = run("c_lora", {"rank": 2}, tasks=3)
    s = cl["state_bytes"]
    assert cl["trains"] == [1, 1, 1] and s[1] - s[0] == pytest.approx(s[2] - s[1], rel=0.01) and s[1] > s[0]
    with pytest.raises(UserError, match="unknown"):
        B.bench(o, [], "h", None, runner=B.run_case, cls_methods={"no_such_method": {}})


def test_cls_method_cost_table_is_each_methods_epochs_passes_and_evaluation_over_its_rates():
    df = pd.DataFrame([
        {"case": "cls_method", "way": "ours", "method": "m", "rate": 100.0, "eval_images_per_s": 500.0,
         "hook_passes": 1, "trains": "1;0", "hook_s": "10;20", "state_bytes": "1000000000;3000000000",
         "peak_memory_gb": 2.0, "arch": "vitb16", "batch": 4},
        {"case": "cls_method", "way": "ours", "method": "none", "rate": float("nan"), "eval_images_per_s": 600.0,
         "hook_passes": 0, "trains": "0", "hook_s": "0", "state_bytes": "5", "peak_memory_gb": 1.0,
         "arch": "vitb16", "batch": 4},
    ])
    df = pd.concat([df, df.iloc[[0]].assign(method="upper_bound")], ignore_index=True)
    df["method"] = df.method.replace({"m": "ft", "none": "simplecil"})
    cfg = {"cls_n_tasks": [4], "cls_seeds": [0, 1, 2], "cls_methods": ["ft", "simplecil", "coda_p", "upper_bound"],
           "cls_train": {"epochs": 5}, "cls_method_settings": {"simplecil": {"epochs": 7}}}
    mc = B.cls_method_cost_table(df, cfg).set_index("method")
    assert list(mc.index) == ["ft", "simplecil", "upper_bound"]  # coda_p: not measured
    m = mc.loc["ft"]
    # the first task trains (5 epochs x 24,000 / 4 images at 100/s); the last task's trains=0 carries on
    assert m.train_h_per_run == pytest.approx(5 * 6000 / 100 / 3600)
    # hooks: 10 + 20 + 20 + 20 s, + 4 tasks x one pass over 6,000 images at 500/s
    assert m.passes_h_per_run == pytest.approx((70 + 4 * 6000 / 500) / 3600)
    # every seen task's test images after every task: 6,000 x (4 + 1) / 2 at 500/s
    assert m.evaluation_h_per_run == pytest.approx(6000 * 2.5 / 500 / 3600)
    # the kept state carried on linearly to the 4th task: 1, 3, 5, 7 GB
    assert m.state_gb == pytest.approx(7) and m.runs == 3
    assert m.total_h == pytest.approx(3 * (m.train_h_per_run + m.passes_h_per_run + m.evaluation_h_per_run))
    n = mc.loc["simplecil"]
    assert n.train_h_per_run == 0 and n.epochs == 7 and n.passes_h_per_run == 0
    # the upper bound trains one task of all 24,000 images (its first measured task) and is evaluated once
    u = mc.loc["upper_bound"]
    assert u.train_h_per_run == pytest.approx(5 * 24000 / 100 / 3600) and u.state_gb == pytest.approx(1)
    assert u.passes_h_per_run == pytest.approx((10 + 24000 / 500) / 3600)
    assert u.evaluation_h_per_run == pytest.approx(6000 / 500 / 3600)
    md = B.method_cost_markdown(df, cfg)
    assert "| 4 | ft | 5 | 0.08 | 0.03 | 0.01 | 3 |" in md and "| all | | | | | | 9 |" in md
    assert B.cls_method_cost_table(df.assign(case="cls_eval"), cfg).empty
