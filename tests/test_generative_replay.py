"""generative_replay: Shin et al.'s mixed objective on a batch; replayed samples of past concepts join the training data."""
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method
from continual_bench.methods.t2i.generative_replay import mix_losses


def test_mix_equation_on_a_hand_made_batch():
    per = torch.tensor([1.0, 2.0, 3.0, 5.0])
    rep = torch.tensor([False, False, True, True])
    # r * mean(real) + (1 - r) * mean(replay) = 0.25 * 1.5 + 0.75 * 4 = 3.375
    assert torch.isclose(mix_losses(per, rep, 0.25), torch.tensor(3.375))
    assert torch.isclose(mix_losses(per, torch.zeros(4, dtype=torch.bool), 0.25), torch.tensor(2.75))  # no replay: mean
    assert torch.isclose(mix_losses(per, torch.ones(4, dtype=torch.bool), 0.25), torch.tensor(2.75))


def test_replay_of_past_concepts_only(tiny_pipeline):
    cls = get_method("t2i", "generative_replay")
    m = cls(T2IModel.from_pretrained(tiny_pipeline),
            build_settings(cls.Settings, {"n_replay": 3, "replay_steps": 2, "rank": 2}, "t"), seed=0)
    t1 = Task(index=1, concept="a", token="<v1>", prompt="a photo of <v1>", images=torch.rand(2, 3, 32, 32))
    m.begin_task(t1)
    images, prompts = m.training_data(t1)
    assert images is t1.images and m.r == 1.0  # nothing to replay at task 1
    m.end_task(t1)
    state = m.state_dict()
    m = cls(T2IModel.from_pretrained(tiny_pipeline), m.settings, seed=0)  # as the engine: a fresh model per task
    m.load_state(state, [t1])
    t2 = Task(index=2, concept="b", token="<v2>", prompt="a photo of <v2>", images=torch.rand(2, 3, 32, 32), past=[t1])
    m.begin_task(t2)
    images, prompts = m.training_data(t2)
    assert images.shape == (5, 3, 32, 32) and float(images[2:].min()) >= 0 and float(images[2:].max()) <= 1
    assert prompts == ["a photo of <v2>"] * 2 + ["a photo of <v1>"] * 3 and m.r == 0.5  # r = 1/t
