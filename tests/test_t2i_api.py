"""The plugin API's extensions: ``training_data`` (per-image prompts), ``uses_past_data``, class captions."""
import json

import torch

from continual_bench.data.datasets import PreparedDataset
from continual_bench.engine import runner
from continual_bench.engine import t2i as engine
from continual_bench.evaluation.t2i_eval import generic_prompt as eval_generic_prompt
from continual_bench.methods.base import T2IMethod, Task, TrainSettings, generic_prompt


def _task(i, n=0, past=()):
    return Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>", images=torch.zeros(n, 3, 4, 4),
                class_word="person", past=list(past))


def test_default_training_data_is_the_tasks_images_with_its_prompt():
    t = _task(2, n=3, past=[_task(1, n=5)])
    images, prompts = T2IMethod(None, TrainSettings()).training_data(t)
    assert images is t.images and prompts == ["a photo of <v2>"] * 3
    assert not T2IMethod.uses_past_data


def test_generic_prompt_is_evaluations():
    assert generic_prompt("person") == eval_generic_prompt("person") == _task(1).generic_prompt == "a photo of a person"
    assert generic_prompt("") == eval_generic_prompt("")


def test_tasks_carry_generic_captions_only(tiny_world):
    ds = PreparedDataset(tiny_world)
    tasks = engine.make_tasks(ds, ds.concepts()[:2], "person", "a photo of {token}")
    generic = {r.caption for r in ds.records(concept="generic")}
    assert tasks[0].class_captions and set(tasks[1].class_captions) == generic
    assert len(set(tasks[0].class_captions)) == len(tasks[0].class_captions)


class _FakeModel:
    image_size = 8


def _fake_method(uses_past):
    cls = type("Fake", (T2IMethod,), {"uses_past_data": uses_past, "name": "fake"})
    return cls(_FakeModel(), TrainSettings())


def _run_engine_recording(spec, tmp_path, monkeypatch, uses_past):
    seen = []

    def fake_train(method, task, seed):
        seen.append((task.index, len(task.images), [len(p.images) for p in task.past]))
        return {"task": task.index, "concept": task.concept, "loss_first": 0.0, "loss_last": 0.0, "seconds": 0.0}

    monkeypatch.setattr(spec, "restore", lambda ckpt_dir, t: _fake_method(uses_past))
    monkeypatch.setattr(engine, "train_one_task", fake_train)
    monkeypatch.setattr(runner.Checkpoints, "save", lambda *a: None)
    engine.train_sequence(spec, tmp_path / f"ck{uses_past}")
    return seen


def test_engine_gives_past_images_only_to_methods_that_use_past_data(tiny_world, tiny_pipeline, tmp_path, monkeypatch):
    spec = engine.RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="lora_sequential", n_tasks=3, seed=0,
                          class_word="person")
    n = len(spec.ds.records(concept=spec.sequence[0], split="train"))
    assert _run_engine_recording(spec, tmp_path, monkeypatch, False) == [(1, n, []), (2, n, [0]), (3, n, [0, 0])]
    assert _run_engine_recording(spec, tmp_path, monkeypatch, True) == [(1, n, []), (2, n, [n]), (3, n, [n, n])]
    assert all(len(t.images) == 0 for t in spec.tasks)  # emptied again after every task
    assert json.loads((spec.checkpoint_dir(tmp_path / "ckTrue") / "run.json").read_text())["method"] == "lora_sequential"
