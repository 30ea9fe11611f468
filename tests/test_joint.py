"""joint: the union of all seen concepts' real images, one prompt per image; past tokens train and are stored."""
import pytest
import torch
from safetensors.torch import load_file

from continual_bench.engine.t2i import RunSpec, train_sequence
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method


def _task(i, n, past=()):
    return Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>",
                images=torch.full((n, 3, 2, 2), float(i)), past=list(past))


def test_joint_trains_on_the_union_with_per_image_prompts():
    cls = get_method("t2i", "joint")
    m = cls(None, build_settings(cls.Settings, {}, "t"))
    t1 = _task(1, 2)
    t2 = _task(2, 3, [t1])
    images, prompts = m.training_data(t2)
    # L_t = mean over D_1 u D_2: 2 images of concept 1, then 3 of concept 2, each with its own prompt
    assert images[:, 0, 0, 0].tolist() == [1, 1, 2, 2, 2]
    assert prompts == ["a photo of <v1>"] * 2 + ["a photo of <v2>"] * 3
    t1.images = torch.empty(0)
    with pytest.raises(ValueError, match=r"no real images of task\(s\) \[1\].*uses_past_data"):
        m.training_data(t2)
    assert cls.uses_past_data


def test_joint_smoke_batches_match_prompts_and_resume(tiny_pipeline, tiny_world, tmp_path, monkeypatch):
    cls = get_method("t2i", "joint")
    seen = []
    loss = cls.loss

    def spy(self, batch):
        seen.append((batch["task"].index, batch["images"].clone(), list(batch["prompts"])))
        return loss(self, batch)

    monkeypatch.setattr(cls, "loss", spy)
    spec = RunSpec(backbone=tiny_pipeline, data_dir=tiny_world, method="joint", n_tasks=2, seed=0, class_word="person",
                   settings={"steps": 2, "batch_size": 4, "rank": 2})
    metas = train_sequence(spec, tmp_path / "ck")
    assert metas[1]["N_train"] == metas[0]["N_train"] + 32  # one more trainable token row (text width 32)
    real = {t.prompt: spec.ds.images(concept=t.concept, split="train", size=32) for t in spec.tasks}
    prompts_in_task2 = set()
    for task_index, images, prompts in seen:
        for img, p in zip(images, prompts):  # every image is a (possibly flipped) real image of its prompt's concept
            ref = real[p]
            assert ((ref - img).abs().amax((1, 2, 3)).min() < 1e-6) or ((ref.flip(-1) - img).abs().amax((1, 2, 3)).min() < 1e-6)
            if task_index == 2:
                prompts_in_task2.add(p)
    assert prompts_in_task2 == {"a photo of <v1>", "a photo of <v2>"}
    # the state after task 2 holds concept 1's token as trained jointly in task 2 (engine resumes from it)
    ck = spec.checkpoint_dir(tmp_path / "ck")
    s1, s2 = (load_file(str(ck / f"task_{t:03d}" / "state.safetensors")) for t in (1, 2))
    assert not torch.equal(s1["task1.token"], s2["task1.token"]) and "task2.token" in s2
