"""The shared engine (continual_bench.engine.runner) on a toy method: the optimizer step, gradient accumulation,
the non-finite-loss stop, the task record, and the checkpoint folder's two resume policies."""
import json
import logging

import pytest
import torch

from continual_bench.engine.runner import Checkpoints, TaskLoop, seed_task


class Toy:
    """A one-parameter 'method': loss = (w - target)^2 per batch."""

    name = "toy"

    def __init__(self):
        self.w = torch.nn.Parameter(torch.tensor(0.0))
        self.ended = None

    def loss(self, batch):
        return {"loss": (self.w - batch["target"]) ** 2}

    def n_trained(self):
        return 1

    def n_stored(self):
        return 2

    def end_task(self, task):
        self.ended = task

    def state_dict(self):
        return {"w": self.w.detach().reshape(1)}


class Task:
    index = 3


def _loop(method, lr=0.1):
    groups = [{"params": [method.w]}]
    return TaskLoop(method, Task(), torch.optim.SGD(groups, lr=lr), groups, device="cpu", total_steps=2)


def test_step_accumulates_lazily_drawn_batches_and_finish_records_the_task():
    m = Toy()
    loop = _loop(m)
    drawn = []

    def batches():
        for target in (1.0, 3.0):
            drawn.append(target)
            assert len(drawn) == 1 or m.w.grad is not None  # drawn after the previous batch's backward
            yield {"target": torch.tensor(target)}

    total = loop.step(batches(), "step 0", accum=2)
    assert total == pytest.approx((1.0 + 9.0) / 2)
    assert m.w.item() == pytest.approx(0.1 * (2 * 1.0 + 2 * 3.0) / 2)  # the mean gradient, one update
    loop.step([{"target": torch.tensor(1.0)}], "step 1")
    meta = loop.finish(first=1, last=1)
    assert m.ended is loop.task and meta["loss_first"] == pytest.approx(5.0) and meta["N_train"] == 1
    assert meta["N_store"] == 2 and set(meta) == {"loss_first", "loss_last", "N_train", "N_store", "seconds"}


def test_non_finite_loss_names_the_task_and_step():
    loop = _loop(Toy())
    with pytest.raises(FloatingPointError, match=r"method toy: non-finite loss inf at task 3 epoch 1 step 7"):
        loop.step([{"target": torch.tensor(float("inf"))}], "epoch 1 step 7")
    with pytest.raises(FloatingPointError, match="no training step at task 3"):
        _loop(Toy()).finish(first=1, last=1)


def test_seed_task_is_per_track_and_task():
    a = seed_task("", 0, 1).initial_seed()
    assert a == seed_task("", 0, 1).initial_seed() != seed_task("cls-", 0, 1).initial_seed() != seed_task("", 0, 2)


def test_checkpoint_policies(tmp_path, caplog):
    for keep in (True, False):
        ck = Checkpoints(tmp_path / str(keep), keep_states=keep)
        for t in (1, 2, 3):
            ck.save(t, Toy(), {"task": t})
        states = [(ck.task_dir(t) / "state.safetensors").exists() for t in (1, 2, 3)]
        assert states == ([True, True, True] if keep else [False, False, True])
        assert set(ck.finished(3)) == {1, 2, 3} and ck.finished(3)[2]["task"] == 2
        assert json.loads((ck.task_dir(1) / "meta.json").read_text())["state_sha256"]
    keep, last = Checkpoints(tmp_path / "True"), Checkpoints(tmp_path / "False", keep_states=False)
    state = keep.task_dir(1) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="continual_bench"):
        assert set(keep.finished(3)) == {2, 3}  # every state kept: only the corrupt task is trained again
    assert any("training task 1 again from task 0" in r.getMessage() for r in caplog.records)
    state = last.task_dir(3) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-1])
    assert last.finished(3).keys() == {1, 2, 3}  # every task's results are in its meta.json: nothing to resume
    (last.task_dir(3) / "meta.json").unlink()
    assert last.finished(3) == {}  # the state of task 2 is gone (only the last is kept): start again
