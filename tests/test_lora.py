"""LoRA sits on exactly the cross-attention K/V projections; the fold equation W += s * B A."""
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method
from continual_bench.methods.lora import lora_delta, lora_pairs


def _method(pipe, **kw):
    cls = get_method("t2i", "lora_sequential")
    return cls(T2IModel.from_pretrained(pipe), build_settings(cls.Settings, kw, "test"), seed=0)


def _task(i):
    return Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>", images=torch.empty(0))


def test_lora_targets_cross_attention_kv_only(tiny_pipeline):
    m = _method(tiny_pipeline, rank=2)
    m.begin_task(_task(1))
    names = sorted(lora_pairs(m.model.unet))
    assert names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    n_cross = sum(1 for n, _ in m.model.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))
    assert len(names) == n_cross
    trainable = {n for n, p in m.model.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "attn2" in n for n in trainable)
    # N_train: r*(in+out) per matrix + one embedding row
    expected = sum(a.numel() + b.numel() for a, b, _ in lora_pairs(m.model.unet).values()) + m.emb.shape[1]
    assert m.n_trained() == expected


def test_fold_equation_on_small_tensors():
    a = torch.tensor([[1.0, 2.0, 0.0]])  # r=1 x in=3
    b = torch.tensor([[1.0], [-1.0]])  # out=2 x r=1
    expected = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]]) * 0.5
    assert torch.equal(lora_delta(a, b, 0.5), expected)


def test_state_rebuilds_the_same_model(tiny_pipeline):
    m = _method(tiny_pipeline, rank=2)
    t1 = _task(1)
    m.begin_task(t1)
    with torch.no_grad():  # pretend training moved the adapter and the token
        for a, b, _ in lora_pairs(m.model.unet).values():
            b.normal_()
        m.emb[m.token_id] += 1.0
    name, (a, b, s) = next(iter(lora_pairs(m.model.unet).items()))
    w0 = m.model.unet.get_submodule(name).base_layer.weight.detach().clone()
    m.end_task(t1)
    state = m.state_dict()
    fresh = _method(tiny_pipeline, rank=2)
    fresh.load_state(state, [t1])
    w1 = fresh.model.unet.get_submodule(name).weight
    assert torch.allclose(w1, w0 + s * b.detach() @ a.detach())  # W_1 = W_init + A_1 B_1
    assert torch.equal(fresh.model.token_embeddings()[fresh.model.token_id("<v1>")], state["task1.token"])
    assert fresh.n_stored() == sum(v.numel() for k, v in state.items() if not k.endswith("scaling"))
