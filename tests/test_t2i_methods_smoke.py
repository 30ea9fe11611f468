"""Smoke test of the new t2i methods: 2 tasks x 2 steps at batch 2 through the engine's loop, as the engine
runs them (a fresh model per task brought to the state after t-1), and resume exactness: the model rebuilt
by state_dict -> fresh model -> load_state samples what the live model sampled and stores the same state.
(``joint`` runs through the whole engine in test_joint.py; the other LFS-Diffusion readings are ``lfs_diffusion``
with defaults changed, test_lfs_diffusion.py; two of them, image and model context, run here.)"""
import pytest
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.data.datasets import PreparedDataset
from continual_bench.engine.t2i import make_tasks, train_one_task
from continual_bench.methods.base import build_settings
from continual_bench.methods.registry import get_method

FAST = {  # toy-of-the-toy settings: a few sampler steps
    "lora_per_concept": {},
    "lora_merge_consecutive": {},
    "lora_merge_orthogonal": {},
    "lora_merge_magnitude": {},
    "cidm": {},
    "generative_replay": {"n_replay": 2, "replay_steps": 2},
    "custom_diffusion_merge": {"ridge": 1e-4},  # random-weight test encoder: G needs a ridge
    "lfs_diffusion": {"kd_timesteps": 3, "kd_n_traj": 1, "kd_batch": 2, "icgen_steps": 2, "icgen_n_context": 2},
    "lfs_diffusion_kd_previous_model_context": {"kd_timesteps": 3, "kd_n_traj": 1, "kd_batch": 2, "icgen_steps": 2,
                                                "icgen_n_context": 2},
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_two_tasks_then_exact_resume(name, tiny_pipeline, tiny_world):
    cls = get_method("t2i", name)
    settings = build_settings(cls.Settings, {"steps": 2, "batch_size": 2, **FAST[name]}, name)
    ds = PreparedDataset(tiny_world)
    tasks = make_tasks(ds, ds.concepts()[:2], "person", "a photo of {token}")
    metas, state, live = [], {}, None
    for t in tasks:  # as the engine does: a fresh model per task, brought to the state after t-1
        m = cls(T2IModel.from_pretrained(tiny_pipeline), settings, seed=0)
        if t.index > 1:
            m.load_state(state, tasks[: t.index - 1])
            assert sorted(m.state_dict()) == sorted(state) and all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
            b = m.generate(tasks[0], 2, seed=1, steps=2)  # resumed vs live model after task 1: the same samples
            assert abs(live.astype(int) - b.astype(int)).max() <= 1
        given = [t, *t.past] if cls.uses_past_data else [t]
        for tk in given:
            tk.images = ds.images(concept=tk.concept, split="train", size=32)
        metas.append(train_one_task(m, t, seed=0))
        for tk in given:
            tk.images = torch.empty(0)
        state = m.state_dict()
        if t.index == 1:
            live = m.generate(t, 2, seed=1, steps=2)
            assert live.shape == (2, 32, 32, 3)
    assert all(x["loss_last"] > 0 and x["N_train"] > 0 for x in metas) and metas[1]["N_store"] > metas[0]["N_store"]
    assert m.generate(tasks[1], 2, seed=1, steps=2).shape == (2, 32, 32, 3)
