"""lora_per_concept: the prompt's concept token selects its LoRA; the generic prompt uses the base weights."""
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method
from continual_bench.methods.lora import base_weight, lora_layers, lora_pairs


def _method(pipe, **kw):
    cls = get_method("t2i", "lora_per_concept")
    return cls(T2IModel.from_pretrained(pipe), build_settings(cls.Settings, kw, "test"), seed=0)


def _task(i):
    return Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>", images=torch.empty(0),
                class_word="person")


def _weight(m, name):
    return base_weight(m.model.unet.get_submodule(name)).detach().clone()


def test_prompt_selects_its_lora_and_generic_prompt_uses_base_weights(tiny_pipeline):
    rank = 2
    tasks = [_task(1), _task(2)]
    state = {}
    for k, t in enumerate(tasks, start=1):  # as the engine does: a fresh model per task, state after t-1 loaded
        m = _method(tiny_pipeline, rank=rank, alpha=1.0)  # scaling = alpha / rank = 0.5
        m.load_state(state, tasks[: k - 1])
        m.begin_task(t)
        with torch.no_grad():  # "trained" pair k: A = first column 1, B = k: s * B A = 0.5 * k * rank in column 0
            for a, b, _ in lora_pairs(m.model.unet, m.adapter).values():
                a.zero_()[:, 0] = 1.0
                b.fill_(float(k))
        m.end_task(t)
        state = m.state_dict()
    name = next(iter(lora_layers(m.model.unet, None)))
    w0 = _weight(m, name)
    assert torch.equal(w0, base_weight(T2IModel.from_pretrained(tiny_pipeline).unet.get_submodule(name)))
    # m: resumed from task 1's state (nothing folded: LoRA 1 is the adapter "concept1"), live for task 2
    assert sorted(lora_layers(m.model.unet, "concept1")) == sorted(lora_layers(m.model.unet, "concept2"))
    with m.weights_for("a photo of a person") as chosen:
        assert chosen == [] and torch.equal(_weight(m, name), w0)
    for k in (1, 2):
        with m.weights_for(f"a photo of <v{k}>") as chosen:
            assert chosen == [k]
            expected = w0.clone()
            expected[:, 0] += 0.5 * k * rank  # W_init + A_k B_k
            assert torch.allclose(_weight(m, name), expected, atol=1e-6)
    assert torch.equal(_weight(m, name), w0)  # restored after the block
    assert m.n_stored() == 2 * m.n_trained()  # N_store grows with the tasks
    # generation goes through the selection: concept 1's samples differ from the base model's, generic's do not
    kw = dict(seed=0, steps=2, guidance=1.0)
    base = T2IModel.generate(m.model, ["a photo of <v1>"] * 2, **kw)  # adapter disabled: base weights
    assert (m.generate(tasks[0], 2, **kw) != base).any()
    generic = T2IModel.generate(m.model, ["a photo of a person"] * 2, **kw)
    assert (m.generate_prompt("a photo of a person", 2, **kw) == generic).all()
