"""Result integrity (issue 16), the parts that need no DAG: settings ranges, the whole-config check, corrupt run
files (checkpoints, train.json, samples.npz), the tables' expected runs, a plugin calling sys.exit.

The workflow-level checks (a bad config stops `snakemake -n`, shell quoting, a failed evaluate keeping the last
metrics, kill/resume) are in test_config_check.py, test_paper_profile.py and test_dag.py.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from continual_bench.config_check import check_config, coerce_cli_ints, schema_error
from continual_bench.engine.t2i import RunSpec, train_sequence
from continual_bench.methods.base import build_settings, setting_meta
from continual_bench.methods.registry import get_method, list_methods
from continual_bench.utils import UserError

REPO = Path(__file__).resolve().parent.parent


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------- settings ranges
@pytest.mark.parametrize("track, method, overrides, expected", [
    ("t2i", "lora_sequential", {"lr": 0}, "method_settings.lora_sequential.lr: 0.0 is out of range; allowed: lr > 0"),
    ("t2i", "c_lora", {"lam": -1}, "method_settings.c_lora.lam: -1.0 is out of range; allowed: lam >= 0"),
    ("t2i", "lora_sequential", {"steps": -5}, "method_settings.lora_sequential.steps: -5 is out of range; allowed: steps >= 1"),
    ("t2i", "lora_sequential", {"rank": 0}, "method_settings.lora_sequential.rank: 0 is out of range; allowed: rank >= 1"),
    ("t2i", "dreambooth", {"batch_size": 0}, "method_settings.dreambooth.batch_size: 0 is out of range; allowed: batch_size >= 1"),
    ("t2i", "lora_sequential", {"lr": "nan"}, "lr: nan is out of range"),
    ("t2i", "lora_sequential", {"steps": True}, "method_settings.lora_sequential.steps: expected int, got True"),
    ("t2i", "lfs_diffusion", {"icgen_context": "images"}, "icgen_context: 'images' is not valid; allowed: one of ['image', 'model']"),
    ("t2i", "lfs_diffusion_no_icgen", {"icgen_strength": 1.5}, "icgen_strength: 1.5 is out of range; allowed: icgen_strength > 0 and icgen_strength <= 1"),
    ("t2i", "dreambooth", {"prior_source": "now"}, "prior_source: 'now' is not valid; allowed: one of ['base', 'current']"),
    ("cls", "coda_p", {"length": 5}, "length: 5 is out of range; allowed: length >= 2 and a multiple of 2"),
    ("cls", "coda_p", {"layers": "0;1"}, "layers: '0;1' is not valid"),
    ("cls", "l2p", {"top_k": 11}, "top_k: 11 is out of range; allowed: top_k <= pool (10)"),
    ("cls", "ft", {"schedule": "step"}, "schedule: 'step' is not valid; allowed: one of ['cosine', 'constant']"),
    ("cls", "lwf", {"temperature": 0}, "temperature: 0.0 is out of range; allowed: temperature > 0"),
])
def test_out_of_range_settings_are_refused_by_name(track, method, overrides, expected):
    table = "method_settings" if track == "t2i" else "cls_method_settings"
    with pytest.raises(UserError) as err:
        build_settings(get_method(track, method).Settings, overrides, f"{table}.{method}")
    assert expected in _one_line(err)


def test_every_builtin_setting_has_help_and_a_valid_default():
    checked = 0
    for row in list_methods():
        if not row["module"].startswith("continual_bench."):
            continue  # plugins may declare plain fields
        S = get_method(row["track"], row["name"]).Settings
        defaults = S()
        for f in dataclasses.fields(S):
            meta = setting_meta(S, f.name)
            assert meta.get("help"), f"{row['track']}/{row['name']}.{f.name} has no help text"
            if f.type not in ("bool", bool):
                assert set(meta) - {"help"}, f"{row['track']}/{row['name']}.{f.name} has no valid range"
            checked += 1
        build_settings(S, dataclasses.asdict(defaults), row["name"])  # every default is within its own range
    assert checked > 200


# ------------------------------------------------------------------------------------------- the whole config
def _config(**over) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over, expected", [
    ({"method_settings": {"lora_seqential": {"lr": 1e-3}}}, "method_settings.lora_seqential: unknown method 'lora_seqential'"),
    ({"methods": ["lora_sequential", "lora_seq"]}, "methods: 'lora_seq': unknown method 'lora_seq' for track 't2i'"),
    ({"cls_methods": ["coda"]}, "cls_methods: 'coda': unknown method 'coda' for track 'cls'"),
    ({"n_tasks": [5, 25]}, "n_tasks: 25 is out of range for toy_faces, which has 20 concepts (toy.n_concepts); allowed: 1..20"),
    ({"cls_n_tasks": [7]}, "cls_n_tasks: 7 does not split toy_imagenet_r's 40 classes (toy_cls.n_classes) into equal tasks"),
    ({"benchmark_settings": {"toy_faces": {"steps": 0}}}, "benchmark_settings.toy_faces (method lora_sequential).steps: 0 is out of range"),
    ({"benchmark_settings": {"toy_face": {"steps": 1}}}, "benchmark_settings.toy_face: not a text-to-image benchmark"),
    ({"cls_train": {"epochs": 0}}, "cls_train (method ft).epochs: 0 is out of range; allowed: epochs >= 1"),
])
def test_whole_config_check_names_key_value_and_range(over, expected):
    with pytest.raises(UserError) as err:
        check_config(_config(**over), REPO)
    assert expected in _one_line(err)


def test_shipped_configs_pass_the_check():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for path in sorted((REPO / "config").glob("*.yaml")):
        cfg = {**base, **yaml.safe_load(path.read_text())}
        check_config(cfg, REPO)


def test_schema_errors_are_one_line_and_cli_ints_keep_their_sign():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    cfg = _config(seeds=["-1", "2"])
    coerce_cli_ints(cfg)
    assert cfg["seeds"] == [-1, 2]
    assert schema_error(cfg, schema) == "seeds[0]: -1 is less than the minimum of 0"
    for name in ("..", ".", "..."):
        msg = schema_error(_config(run_name=name), schema)
        assert msg.startswith(f"run_name: '{name}' does not match") and "not only dots" in msg and "\n" not in msg
    assert schema_error(_config(run_name="v1.2-final"), schema) is None
    msg = schema_error(_config(paper={"base_url": "http://127.0.0.1/$(touch X)"}), schema)
    assert msg.startswith("paper.base_url: 'http://127.0.0.1/$(touch X)' does not match")
    assert schema_error(_config(paper={"base_url": "http://127.0.0.1:8080/mirror"}), schema) is None
    assert schema_error(_config(paper={"manual_dir": "data/my manual $dir"}), schema) is None  # quoted, not refused
    assert schema_error(_config(cls_paper={"backbone_name": "vit; rm -rf ~"}), schema).startswith("cls_paper.backbone_name")


# ------------------------------------------------------------------------------------------- corrupt run files
def _spec(pipe, world, **settings):
    return RunSpec(backbone=pipe, data_dir=world, method="lora_sequential", n_tasks=2, seed=0,
                   settings={"steps": 2, "batch_size": 2, "rank": 2, **settings})


def test_corrupt_checkpoint_is_named_and_retrained_from_the_previous_task(tiny_pipeline, tiny_world, tmp_path, caplog):
    spec = _spec(tiny_pipeline, tiny_world)
    root = tmp_path / "seed0" / "checkpoints"  # a run folder's layout
    first = train_sequence(spec, root)
    ck = spec.checkpoint_dir(root)
    state = ck / "task_001" / "state.safetensors"
    good = state.read_bytes()
    assert json.loads((ck / "task_001" / "meta.json").read_text())["state_sha256"] == first[0]["state_sha256"]
    later = (ck / "task_002" / "state.safetensors").stat().st_mtime_ns

    state.write_bytes(good[: len(good) // 2])  # truncated: every load names the file and the repair
    with pytest.raises(UserError) as err:
        spec.restore(ck, 1)
    msg = _one_line(err)
    assert msg.startswith(f"{state}: corrupt checkpoint (sha256 ") and "recorded in meta.json" in msg
    assert msg.endswith(f"repair: delete {tmp_path / 'seed0' / 'train.json'} and run snakemake again (training checks "
                        "every checkpoint and retrains a corrupt task from the one before)")

    with caplog.at_level(logging.WARNING, logger="continual_bench"):
        again = train_sequence(_spec(tiny_pipeline, tiny_world), root)
    assert any(str(state) in r.getMessage() and "training task 1 again" in r.getMessage() for r in caplog.records)
    assert state.read_bytes() == good  # retrained from the base model: the same bytes (same seed, same machine)
    assert [m["loss_last"] for m in again] == [m["loss_last"] for m in first]
    assert (ck / "task_002" / "state.safetensors").stat().st_mtime_ns == later  # intact: not retrained

    flipped = bytearray(good)  # same size, one byte changed: only the recorded sha256 catches it
    flipped[-1] ^= 0xFF
    state.write_bytes(bytes(flipped))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="continual_bench"):
        train_sequence(_spec(tiny_pipeline, tiny_world), root)
    assert any("sha256" in r.getMessage() for r in caplog.records) and state.read_bytes() == good

    meta_path = ck / "task_002" / "meta.json"  # a checkpoint from before the hash: a truncation is still found
    meta = json.loads(meta_path.read_text())
    meta.pop("state_sha256")
    meta_path.write_text(json.dumps(meta))
    state2 = ck / "task_002" / "state.safetensors"
    state2.write_bytes(state2.read_bytes()[:-10])
    with pytest.raises(UserError, match="bytes, the header describes"):
        spec.restore(ck, 2)


def test_cls_resume_from_a_corrupt_state_restarts_from_an_intact_one(tmp_path, caplog):
    import torch

    from continual_bench.backbones.vit import build_vit, save_vit
    from continual_bench.data.toy_imagenet_r import write_toy_imagenet_r
    from continual_bench.engine.cls import ClsRunSpec, accuracy_matrix
    from continual_bench.engine.cls import train_sequence as train_cls

    write_toy_imagenet_r(tmp_path / "w", n_classes=4, n_train=2, n_test=1, n_pretrain=2, renditions=("sketch",))
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, conv_stem=True)
    save_vit(build_vit("toy_vit", kwargs), tmp_path / "vit", model_name="toy_vit", kwargs=kwargs)

    def spec():
        return ClsRunSpec(backbone=tmp_path / "vit", data_dir=tmp_path / "w", method="ft", n_tasks=2, seed=0,
                          settings={"epochs": 1, "batch_size": 4, "min_steps": 0}, device="cpu")

    straight = accuracy_matrix(spec(), train_cls(spec(), tmp_path / "a"))
    train_cls(spec(), tmp_path / "b", stop_after=1)  # "killed" after task 1
    state = spec().checkpoint_dir(tmp_path / "b") / "task_001" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="continual_bench"):
        resumed = accuracy_matrix(spec(), train_cls(spec(), tmp_path / "b"))
    assert any(str(state) in r.getMessage() and "corrupt checkpoint" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(straight, resumed)


def test_truncated_train_json_and_samples_are_named(tiny_world, tmp_path):
    from continual_bench.evaluation.t2i_eval import evaluate_run
    from continual_bench.reporting.grids import sample_grid_from_npz

    run = tmp_path / "runs" / "toy_faces" / "T1" / "m" / "seed0"
    run.mkdir(parents=True)
    info = {"sequence": ["concept_00"], "tokens": ["<v1>"], "class_word": "person", "tasks": []}
    (run / "train.json").write_text(json.dumps(info)[:20])
    kw = dict(samples_npz=run / "samples.npz", data_dir=tiny_world, judge=None, ident={}, provenance={},
              out_metrics=run / "metrics.csv", out_R=run / "R.csv")
    with pytest.raises(UserError) as err:
        evaluate_run(train_json=run / "train.json", **kw)
    assert _one_line(err).startswith(f"{run / 'train.json'}: unreadable or truncated JSON")
    assert f"repair: delete {run / 'train.json'} and run snakemake again" in str(err.value)

    (run / "train.json").write_text(json.dumps(info))
    np.savez_compressed(run / "samples.npz", after1_concept1=np.zeros((4, 8, 8, 3), np.uint8))
    data = (run / "samples.npz").read_bytes()
    (run / "samples.npz").write_bytes(data[: len(data) - 40])
    for call in (lambda: evaluate_run(train_json=run / "train.json", **kw),
                 lambda: sample_grid_from_npz(run / "samples.npz", info, tmp_path / "grid.png", "t")):
        with pytest.raises(UserError) as err:
            call()
        msg = _one_line(err)
        assert msg.startswith(f"{run / 'samples.npz'}: unreadable or truncated samples file")
        assert "repair: delete" in msg and "generated again" in msg


def test_nan_loss_names_the_run_task_and_step_and_saves_nothing(tiny_pipeline, tiny_world, tmp_path, monkeypatch):
    import torch

    cls = get_method("t2i", "lora_sequential")
    real = cls.loss

    def loss(self, batch):  # task 2 goes wrong at its second step
        out = real(self, batch)
        if batch["task"].index == 2 and batch["step"] == 1:
            out["loss"] = out["loss"] * torch.tensor(float("inf"))
        return out

    monkeypatch.setattr(cls, "loss", loss)
    spec = _spec(tiny_pipeline, tiny_world)
    with pytest.raises(FloatingPointError) as err:
        train_sequence(spec, tmp_path / "ck")
    msg = str(err.value)
    assert msg.startswith(f"run {tiny_world.name}/T2/lora_sequential/seed0 ") and "at task 2 step 1" in msg
    assert "task 2 was not saved" in msg
    ck = spec.checkpoint_dir(tmp_path / "ck")
    assert (ck / "task_001" / "meta.json").is_file() and not (ck / "task_002").exists()


# ------------------------------------------------------------------------------------------- tables
def _metrics(path: Path, seed: int, value: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("track,benchmark,n_tasks,method,seed,metric,value\n"
                    f"t2i,toy_faces,2,lora_sequential,{seed},A_clip,{value}\n")
    return path


def _tables(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "continual_bench", "tables", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_tables_refuse_missing_runs_unless_allowed(tmp_path):
    res_dir = tmp_path / "results" / "r"
    runs = [res_dir / "runs/toy_faces/T2/lora_sequential" / f"seed{s}" / "metrics.csv" for s in range(3)]
    for s in (0, 2):
        _metrics(runs[s], s, 0.5 + s)
    # the expected runs from --metrics (what the tables rule passes)
    res = _tables(res_dir, "--metrics", *runs, "--noise-floor")
    assert res.returncode == 2 and not (res_dir / "summary.csv").exists()
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("continual-bench: error: 1 of the 3 runs given with --metrics have no metrics file: ")
    assert str(runs[1]) in err and "--allow-missing" in err
    # ... and from results/<run>/config.yaml when no --metrics is given
    (res_dir / "config.yaml").write_text(yaml.safe_dump({"run_name": "r", "benchmarks": ["toy_faces"], "n_tasks": [2],
                                                         "methods": ["lora_sequential"], "seeds": [0, 1, 2]}))
    res = _tables(res_dir, "--noise-floor")
    assert res.returncode == 2 and str(runs[1]) in res.stderr and "config.yaml asks for" in res.stderr
    res = _tables(res_dir, "--noise-floor", "--allow-missing")
    assert res.returncode == 0, res.stderr
    assert str(runs[1]) in res.stderr  # a warning names what is left out
    summary = pd.read_csv(res_dir / "summary.csv")
    assert summary.n_seeds.tolist() == [2] and summary["mean"].tolist() == [1.5]
    assert pd.read_csv(res_dir / "tables" / "toy_faces_T2.csv").n_seeds.tolist() == [2]
    (res_dir / "config.yaml").unlink()  # no config, no --metrics: whatever runs exist (the old behaviour)
    assert _tables(res_dir, "--noise-floor").returncode == 0


# ------------------------------------------------------------------------------------------- plugins
def test_plugin_calling_sys_exit_is_reported_and_the_others_listed(tmp_path):
    site = tmp_path / "site"
    (site / "bad_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "bad_plugin.py").write_text("import sys\nsys.exit(0)\n")
    (site / "bad_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\nVersion: 0.1\n")
    (site / "bad_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[continual_bench.methods]\nbad = bad_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "continual_bench", "methods"], capture_output=True, text=True, env=env)
    assert "lora_sequential" in res.stdout and "coda_p" in res.stdout
    assert "plugin bad (bad_plugin) failed to load: SystemExit" in res.stderr


def test_toy_lengths_uses_toy_full_settings_and_world():
    """config/toy_lengths.yaml changes only the lengths and the method list: a difference from toy_full would make its
    10-task cells disagree with results/toy_full for reasons other than the sequence length."""
    full = yaml.safe_load((REPO / "config" / "toy_full.yaml").read_text())
    lengths = yaml.safe_load((REPO / "config" / "toy_lengths.yaml").read_text())
    assert lengths["n_tasks"] == [5, 10, 20] and set(lengths["methods"]) <= set(full["methods"])
    assert lengths["toy"] == full["toy"] and lengths["evaluation"] == full["evaluation"]
    assert set(lengths["method_settings"]) == set(lengths["methods"])
    for method, settings in lengths["method_settings"].items():
        assert settings == full["method_settings"][method], method
