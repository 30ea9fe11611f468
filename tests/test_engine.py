"""Engine: training runs, checkpoints per task, clear errors (unknown method, bad settings, NaN loss)."""
import json
import subprocess
import sys

import pytest
import torch

from continual_bench.engine.t2i import RunSpec, task_sequence, train_sequence
from continual_bench.data.datasets import PreparedDataset
from continual_bench.methods.registry import get_method
from continual_bench.utils import UserError


def test_task_sequence_is_seeded(tiny_world):
    ds = PreparedDataset(tiny_world)
    a, b, c = task_sequence(ds, 3, 0), task_sequence(ds, 3, 0), task_sequence(ds, 3, 1)
    assert a == b and len(set(a)) == 3 and set(a) <= set(ds.concepts())
    assert a != c or task_sequence(ds, 3, 2) != a
    with pytest.raises(UserError, match="n_tasks=9 but the dataset has only 4 concepts"):
        task_sequence(ds, 9, 0)


def test_train_writes_one_checkpoint_per_task_and_skips_done(tiny_pipeline, tiny_world, tmp_path):
    spec = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_sequential", n_tasks=2, seed=0,
                   settings={"steps": 2, "batch_size": 2, "rank": 2})
    metas = train_sequence(spec, tmp_path / "ck")
    ck = spec.checkpoint_dir(tmp_path / "ck")
    assert [m["task"] for m in metas] == [1, 2]
    for t in (1, 2):
        assert (ck / f"task_{t:03d}" / "state.safetensors").is_file()
    assert metas[1]["N_store"] > metas[0]["N_store"] > 0 and metas[0]["N_train"] > 0
    before = (ck / "task_002" / "state.safetensors").stat().st_mtime_ns
    train_sequence(spec, tmp_path / "ck")  # nothing left to do
    assert (ck / "task_002" / "state.safetensors").stat().st_mtime_ns == before
    method = spec.restore(ck, 2)
    assert method.model.concept_tokens == ["<v1>", "<v2>"]
    # changed settings never resume from these checkpoints, and do not delete them
    other = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_sequential", n_tasks=2, seed=0,
                    settings={"steps": 3, "batch_size": 2, "rank": 2})
    assert other.checkpoint_dir(tmp_path / "ck") != ck
    assert json.loads((ck / "run.json").read_text())["settings"]["steps"] == 2


def test_nan_loss_is_a_clear_error(tiny_pipeline, tiny_world, tmp_path, monkeypatch):
    cls = get_method("t2i", "lora_sequential")
    monkeypatch.setattr(cls, "loss", lambda self, batch: {"loss": torch.tensor(float("nan"), requires_grad=True)})
    spec = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_sequential", n_tasks=1, seed=0,
                   settings={"steps": 2, "batch_size": 2})
    with pytest.raises(FloatingPointError, match="lora_sequential: non-finite loss nan at task 1 step 0"):
        train_sequence(spec, tmp_path / "ck")
    assert not (spec.checkpoint_dir(tmp_path / "ck") / "task_001").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "continual_bench", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line_and_name_the_value(tiny_pipeline, tiny_world, tmp_path):
    common = ["--backbone", str(tiny_pipeline), "--data", str(tiny_world), "--benchmark", "toy_faces",
              "--n-tasks", "1", "--seed", "0", "--ckpt-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "t.json")]
    res = _cli("train", "--method", "nope", *common)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("continual-bench: error: unknown method 'nope'")
    res = _cli("train", "--method", "lora_sequential", "--settings", json.dumps({"rnak": 4}), *common)
    assert res.returncode == 2 and "method_settings.lora_sequential: unknown setting(s) ['rnak']" in res.stderr
    res = _cli("train", "--method", "lora_sequential", "--settings", "{bad json", *common)
    assert res.returncode == 2 and "--settings: not valid JSON" in res.stderr


def _states(ck):
    return {p.parent.name: p.read_bytes() for p in sorted(ck.glob("task_*/state.safetensors"))}


def test_runs_of_other_lengths_lend_their_leading_states(tiny_pipeline, tiny_world, tmp_path, monkeypatch, caplog):
    """A run's first t states are those of any run with the same method, settings, seed, backbone and first t
    concepts: reusing them gives, file for file, the run trained from scratch; anything else lends nothing."""
    def spec(n, **kw):
        return RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_sequential", n_tasks=n, seed=0,
                       settings={"steps": 2, "batch_size": 2, "rank": 2, **kw})
    scratch3 = spec(3).checkpoint_dir(tmp_path / "a")
    train_sequence(spec(3), tmp_path / "a")
    scratch2 = spec(2).checkpoint_dir(tmp_path / "b")
    train_sequence(spec(2), tmp_path / "b")
    assert _states(scratch2) == {k: v for k, v in _states(scratch3).items() if k != "task_003"}  # the premise
    # longer from shorter: tasks 1-2 copied, task 3 trained, the same bytes as from scratch
    metas = train_sequence(spec(3), tmp_path / "c", reuse=[scratch2])
    lent3 = spec(3).checkpoint_dir(tmp_path / "c")
    assert [m.get("reused_from") for m in metas] == [str(scratch2 / "task_001"), str(scratch2 / "task_002"), None]
    assert _states(lent3) == _states(scratch3)
    # shorter from longer: nothing is trained
    monkeypatch.setattr(RunSpec, "train_task", lambda *a: pytest.fail("trained a task it could reuse"))
    metas = train_sequence(spec(2), tmp_path / "d", reuse=[scratch3, lent3])
    assert [m["reused_from"] for m in metas] == [str(scratch3 / "task_001"), str(scratch3 / "task_002")]
    assert _states(spec(2).checkpoint_dir(tmp_path / "d")) == _states(scratch2)
    monkeypatch.undo()
    # other settings, another seed, another dataset record, or the run's own folder lend nothing
    assert spec(2, steps=3).reusable_prefix(scratch3) == 0
    other_seed = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_sequential", n_tasks=2, seed=1,
                         settings={"steps": 2, "batch_size": 2, "rank": 2})
    assert other_seed.reusable_prefix(scratch3) == 0 and spec(1).reusable_prefix(scratch3) == 1
    info = json.loads((scratch3 / "run.json").read_text())
    (scratch3 / "run.json").write_text(json.dumps({**info, "data": {**info["data"], "manifest_sha256": "0" * 64}}))
    assert spec(2).reusable_prefix(scratch3) == 0
    (scratch3 / "run.json").write_text(json.dumps(info))
    # a corrupt lent state is not copied: the task is trained again from the one before
    state = scratch2 / "task_002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-8] + b"\0" * 8)
    with caplog.at_level("INFO"):
        metas = train_sequence(spec(3), tmp_path / "e", reuse=[scratch2])
    assert [m.get("reused_from") for m in metas] == [str(scratch2 / "task_001"), None, None]
    assert _states(spec(3).checkpoint_dir(tmp_path / "e")) == _states(scratch3)
    assert "sha256" in caplog.text and "task 1: state reused from" in caplog.text
