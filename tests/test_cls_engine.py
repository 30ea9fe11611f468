"""Classification engine: a killed run resumes to the identical accuracy matrix; joint runs; clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from continual_bench.backbones.vit import build_vit, load_vit, save_vit
from continual_bench.data.toy_imagenet_r import write_toy_imagenet_r
from continual_bench.engine.cls import ClsRunSpec, accuracy_matrix, train_sequence
from continual_bench.utils import UserError


@pytest.fixture(scope="module")
def cls_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    write_toy_imagenet_r(root / "toy_imagenet_r", n_classes=4, n_train=2, n_test=1, n_pretrain=2,
                         renditions=("sketch", "cartoon"))
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=5, num_heads=2, mlp_ratio=2.0, conv_stem=True)
    save_vit(build_vit("toy_vit", kwargs), root / "vit", model_name="toy_vit", kwargs=kwargs)
    return root


def spec(world, method, **settings):
    return ClsRunSpec(backbone=world / "vit", data_dir=world / "toy_imagenet_r", method=method, n_tasks=2, seed=1,
                      settings={"epochs": 2, "batch_size": 4, "min_steps": 0, **settings}, device="cpu")


def test_toy_world_layout(cls_world):
    from continual_bench.data.cls_data import ClsDataset

    ds = ClsDataset(cls_world / "toy_imagenet_r")
    assert ds.n_classes == 4
    assert len(ds.split("train")) == 4 * 2 * 2 and len(ds.split("test")) == 4 * 2 and len(ds.split("pretrain")) == 8
    info = json.loads((cls_world / "toy_imagenet_r" / "world.json").read_text())
    assert info["renditions"] == ["sketch", "cartoon"] and info["classes"]["000"]["shape"]


def test_toy_world_is_deterministic(tmp_path):
    a = write_toy_imagenet_r(tmp_path / "a", n_classes=2, n_train=1, n_test=1, n_pretrain=1, renditions=("pixel",))
    b = write_toy_imagenet_r(tmp_path / "b", n_classes=2, n_train=1, n_test=1, n_pretrain=1, renditions=("pixel",))
    for f in ("manifest.csv", "001/train_pixel_000.png", "000/pretrain_0000.png"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


@pytest.mark.parametrize("method", ["coda_p", "ft_pp", "simplecil", "aper", "ranpac", "inflora"])
def test_killed_run_resumes_to_identical_accuracy_matrix(cls_world, tmp_path, method):
    s = spec(cls_world, method)
    straight = accuracy_matrix(s, train_sequence(s, tmp_path / "a"))
    first = train_sequence(spec(cls_world, method), tmp_path / "b", stop_after=1)  # "killed" after task 1
    assert len(first) == 1
    ck = spec(cls_world, method).checkpoint_dir(tmp_path / "b")
    assert (ck / "task_001" / "state.safetensors").is_file() and not (ck / "task_002").exists()
    s2 = spec(cls_world, method)
    resumed = accuracy_matrix(s2, train_sequence(s2, tmp_path / "b"))  # a new process would do the same
    np.testing.assert_array_equal(straight, resumed)
    assert np.isnan(straight[0, 1]) and not np.isnan(straight[1]).any() and not np.isnan(straight[0, 0])
    assert not (ck / "task_001" / "state.safetensors").exists()  # only the last state is kept
    assert (ck / "task_001" / "meta.json").is_file()


def test_joint_upper_bound_trains_once_and_fills_last_row(cls_world, tmp_path):
    s = spec(cls_world, "upper_bound", epochs=1)
    metas = train_sequence(s, tmp_path)
    assert len(metas) == 1 and metas[0]["classes"] == s.order
    acc = accuracy_matrix(s, metas)
    assert np.isnan(acc[0]).all() and not np.isnan(acc[1]).any()


def test_settings_and_backbone_errors_are_clear(cls_world, tmp_path):
    with pytest.raises(UserError, match=r"cls_method_settings.coda_p: unknown setting\(s\) \['pol'\]"):
        spec(cls_world, "coda_p", pol=3)
    with pytest.raises(UserError, match="n_tasks=3 does not divide the 4 classes"):
        ClsRunSpec(backbone=cls_world / "vit", data_dir=cls_world / "toy_imagenet_r", method="ft", n_tasks=3, seed=0)
    with pytest.raises(UserError, match="ViT backbone not found"):
        load_vit(tmp_path / "nope")
    res = subprocess.run([sys.executable, "-m", "continual_bench", "train-cls", "--backbone", str(tmp_path / "x.safetensors"),
                          "--data", str(cls_world / "toy_imagenet_r"), "--benchmark", "toy_imagenet_r", "--method", "ft",
                          "--n-tasks", "2", "--seed", "0", "--ckpt-dir", str(tmp_path / "ck"), "--out-train", "a",
                          "--out-metrics", "b", "--out-acc", "c"], capture_output=True, text=True)
    assert res.returncode == 2
    err = [l for l in res.stderr.splitlines() if "error" in l]
    assert err == [f"continual-bench: error: {tmp_path / 'x.safetensors'}: ViT backbone not found (fetch or pretrain it first)"]


def test_toy_backbone_roundtrip(cls_world):
    bb = load_vit(cls_world / "vit")
    assert bb.img_size == 32 and bb.embed_dim == 16 and not any(p.requires_grad for p in bb.parameters())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(bb(x), load_vit(cls_world / "vit")(x))


def test_min_steps_floor_adds_epochs_to_small_tasks(cls_world, tmp_path):
    from continual_bench.engine.cls import task_epochs

    assert task_epochs(15, 225, 15) == 15  # a 5-task toy task (8 classes): unchanged
    assert task_epochs(15, 225, 4) == 57   # a 20-task toy task (2 classes): 57 epochs, 228 steps
    assert task_epochs(15, 0, 4) == 15     # 0 = epochs only (paper profile)
    # each task of this world: 2 classes x 2 images x 2 renditions = 8 images -> 2 batches of 4 per epoch
    metas = train_sequence(spec(cls_world, "ft", min_steps=9), tmp_path)
    assert [(m["epochs"], m["steps"]) for m in metas] == [(5, 10), (5, 10)]
    metas = train_sequence(spec(cls_world, "ft"), tmp_path / "b")
    assert [(m["epochs"], m["steps"]) for m in metas] == [(2, 4), (2, 4)]
    with pytest.raises(UserError, match="min_steps >= 0"):
        spec(cls_world, "ft", min_steps=-1)


def test_holdout_split_is_per_class_fixed_and_disjoint(cls_world):
    from continual_bench.data.cls_data import ClsDataset, holdout_split

    ds = ClsDataset(cls_world / "toy_imagenet_r")
    train = ds.split("train")  # 4 classes x 4 images
    rest, val = holdout_split(train, 0.25)
    assert len(val) == 4 and len(rest) == 12
    assert sorted(val.labels.tolist()) == [0, 1, 2, 3]  # round(0.25 * 4) = 1 image of each class
    assert not set(val.paths) & set(rest.paths) and set(val.paths) | set(rest.paths) == set(train.paths)
    again, val2 = holdout_split(ds.split("train"), 0.25)
    assert val2.paths == val.paths and again.paths == rest.paths  # fixed: no run seed involved
    assert len(holdout_split(train, 0.01)[1]) == 4  # at least one image per class
    with pytest.raises(UserError, match=r"val_fraction=0.9: class 0 has 4 training image\(s\); holding out 4 leaves none"):
        holdout_split(train, 0.9)
    with pytest.raises(UserError, match=r"cls_train.val_fraction must be in \[0, 1\)"):
        holdout_split(train, 1.0)


def test_val_fraction_evaluates_on_held_out_training_images_only(cls_world, tmp_path, monkeypatch):
    """val_fraction > 0: the run trains on the rest of the training split and evaluates on the held-out images;
    the test split is never read (a selection grid cannot see it)."""
    from continual_bench.data import cls_data
    from continual_bench.engine.cls import TaskData, write_train_summary

    s = spec(cls_world, "ft_pp", val_fraction=0.5, epochs=1)
    assert s.eval_split == "val"
    data = TaskData(s)
    train_all = set(cls_data.ClsDataset(cls_world / "toy_imagenet_r").split("train").paths)
    assert set(data.test.paths) <= train_all and not set(data.test.paths) & set(data.train.paths)
    assert len(data.test) == len(data.train) == 8
    reads = []
    real = cls_data.ClsDataset.split
    monkeypatch.setattr(cls_data.ClsDataset, "split", lambda self, name: reads.append(name) or real(self, name))
    metas = train_sequence(s, tmp_path)
    assert reads == ["train"] and len(metas) == 2 and len(metas[1]["acc"]) == 2
    write_train_summary(s, metas, tmp_path / "train.json")
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["eval_split"] == "val" and summary["settings"]["val_fraction"] == 0.5
    assert spec(cls_world, "ft_pp").eval_split == "test"
    with pytest.raises(UserError, match=r"cls_method_settings.ft.val_fraction: 1.0 is out of range; allowed: "
                                        r"val_fraction >= 0 and val_fraction < 1"):
        spec(cls_world, "ft", val_fraction=1.0)


def test_precision_setting_and_fingerprint_of_new_settings(cls_world):
    """precision is validated; settings added in issue 15 at their toy values leave the checkpoint fingerprint as
    it was (an interrupted toy run resumes), other values change it."""
    from continual_bench.engine.cls import FINGERPRINT_NEUTRAL
    from continual_bench.utils import config_hash

    with pytest.raises(UserError, match=r"cls_method_settings.coda_p.precision: 'fp16' is not valid; allowed: one of "
                                        r"\['bf16', 'fp32'\]"):
        spec(cls_world, "coda_p", precision="fp16")
    s = spec(cls_world, "l2p_pp")
    base = s.fingerprint()
    assert {k: getattr(s.settings, k) for k in ("val_fraction", "precision", "key_loss")} == {
        k: FINGERPRINT_NEUTRAL[k] for k in ("val_fraction", "precision", "key_loss")}
    old = {k: v for k, v in s.settings.__dict__.items() if k not in FINGERPRINT_NEUTRAL}  # the settings before them
    assert config_hash({"settings": old}) != config_hash({"settings": s.settings.__dict__})  # so they must be dropped
    for change in ({"precision": "fp32"}, {"key_loss": "coda_p"}, {"val_fraction": 0.5}):
        assert spec(cls_world, "l2p_pp", **change).fingerprint() != base, change
    assert spec(cls_world, "dualprompt", test_keys="pool").fingerprint() != spec(cls_world, "dualprompt").fingerprint()


def test_untrained_tasks_take_no_step_and_the_passes_see_each_training_image_once(cls_world, tmp_path, monkeypatch):
    """A task whose param_groups() hold no parameter runs no optimizer step (SimpleCIL; APER after its first task);
    before_training / after_training read every training image of the task once, un-augmented (no flip)."""
    from continual_bench.engine.cls import TaskData
    from continual_bench.methods.cls.simplecil import SimpleCIL

    seen = []
    original = SimpleCIL.after_training

    def recording(self, task, images):
        batches = list(images())
        seen.append((task.index, torch.cat([x for x, _ in batches]).cpu(), torch.cat([y for _, y in batches]).cpu()))
        return original(self, task, images)

    monkeypatch.setattr(SimpleCIL, "after_training", recording)
    s = spec(cls_world, "simplecil")
    metas = train_sequence(s, tmp_path / "s")
    assert [(m["epochs"], m["steps"], m["loss_first"], m["N_train"]) for m in metas] == [(0, 0, None, 0)] * 2
    data = TaskData(s)
    for (index, x, y), task in zip(seen, s.tasks):
        assert index == task.index
        xs, ys = data.views(task)  # the fixed training views: originals first, then their flips
        n = len(xs) // 2
        torch.testing.assert_close(x, xs[:n], rtol=0, atol=0)
        assert torch.equal(y, ys[:n]) and set(y.tolist()) == set(range(task.lo, task.hi))
    assert all(not np.isnan(a) for m in metas for a in m["acc"])
    metas = train_sequence(spec(cls_world, "aper"), tmp_path / "a")
    assert [(m["epochs"], m["steps"]) for m in metas] == [(2, 4), (0, 0)]
    assert metas[0]["N_train"] > 0 and metas[1]["N_train"] == 0 and metas[1]["loss_last"] is None


def _acc_from_predictions(p) -> np.ndarray:
    """acc[t][i] recomputed from predictions.npz's arrays (NaN where row t has no prediction for task i)."""
    T = p["pred"].shape[0]
    acc = np.full((T, T), np.nan)
    for t in range(T):
        for i in range(T):
            cols = p["task"] == i + 1
            if (p["pred"][t, cols] >= 0).all():
                acc[t, i] = 100.0 * (p["pred"][t, cols] == p["label"][cols]).mean()
    return acc


@pytest.mark.parametrize("method", ["coda_p", "upper_bound"])
def test_predictions_reproduce_the_accuracy_matrix_and_survive_resume(cls_world, tmp_path, method):
    from continual_bench.data.cls_data import ClsDataset
    from continual_bench.engine.cls import predictions, write_predictions, write_train_summary

    s = spec(cls_world, method)
    metas = train_sequence(s, tmp_path / "ck")
    write_predictions(s, metas, tmp_path / "predictions.npz")
    p = dict(np.load(tmp_path / "predictions.npz"))
    np.testing.assert_array_equal(_acc_from_predictions(p), accuracy_matrix(s, metas))
    test = ClsDataset(cls_world / "toy_imagenet_r").split("test")
    assert len(p["image"]) == len(test) and sorted(p["image"]) == list(range(len(test)))  # every test image once
    np.testing.assert_array_equal(p["classes"][p["label"]], test.labels[p["image"]])  # labels are head positions
    assert list(np.unique(p["task"])) == [1, 2] and str(p["split"]) == "test"
    if method == "upper_bound":
        assert (p["pred"][0] == -1).all() and (p["pred"][1] >= 0).all()
    else:
        assert (p["pred"][0][p["task"] == 2] == -1).all() and (p["pred"][1] >= 0).all()
    write_train_summary(s, metas, tmp_path / "train.json")  # the predictions stay out of the committed summary
    assert "pred" not in json.dumps(json.loads((tmp_path / "train.json").read_text())["train"])
    again = predictions(s, train_sequence(spec(cls_world, method), tmp_path / "ck"))  # finished: read from meta.json
    for k in ("pred", "label", "task", "image"):
        np.testing.assert_array_equal(again[k], p[k])


def test_predictions_of_old_checkpoints_are_marked_missing(cls_world, tmp_path, caplog):
    from continual_bench.engine.cls import predictions

    s = spec(cls_world, "ft")
    metas = [{k: v for k, v in m.items() if k != "pred"} if m["task"] == 1 else m
             for m in train_sequence(s, tmp_path)]
    p = predictions(s, metas)
    assert (p["pred"][0] == -1).all() and (p["pred"][1] >= 0).all()
    assert "[1]" in caplog.text and "predictions" in caplog.text
