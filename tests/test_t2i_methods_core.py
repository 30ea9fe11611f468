"""Text-to-image baselines and C-LoRA: each method's equation on hand-made tensors, a 2-step training run
through the engine's loop, exact resume from ``state_dict``, and what a method must leave untouched."""
import copy

import numpy as np
import pytest
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.engine.t2i import train_one_task
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.lora import lora_delta, lora_pairs
from continual_bench.methods.registry import get_method
from continual_bench.methods.t2i.custom_diffusion import _detach_first_token, cross_attention_kv
from continual_bench.methods.t2i.custom_diffusion_ewc import ewc_penalty
from continual_bench.utils import UserError

FAST = {"steps": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def backbone(tiny_pipeline):
    """The tiny pipeline loaded once; every method gets a deep copy (same as a fresh from_pretrained, faster)."""
    return T2IModel.from_pretrained(tiny_pipeline)


def _fresh_model(proto):
    """A deep copy of the loaded backbone (cheaper than from_pretrained). The tokenizer's list of BPE merges
    (read-only: adding a token never writes it) is shared instead of copied tuple by tuple."""
    merges = getattr(proto.pipe.tokenizer, "_merges", None)
    memo = {id(merges): merges} if merges is not None else {}
    return T2IModel(copy.deepcopy(proto.pipe, memo), proto.device)


def _method(proto, name, **kw):
    cls = get_method("t2i", name)
    model = _fresh_model(proto)
    return cls(model, build_settings(cls.Settings, {**FAST, **kw}, "test"), seed=0)


def _task(i, size=32, n=4):
    g = torch.Generator().manual_seed(100 + i)
    return Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>",
                images=torch.rand(n, 3, size, size, generator=g), class_word="person")


def _resume(pipe, m, name, tasks, **kw):
    """A fresh model brought to ``m``'s state through state_dict/load_state (the engine's resume path)."""
    fresh = _method(pipe, name, **kw)
    bare = [Task(index=t.index, concept=t.concept, token=t.token, prompt=t.prompt, images=torch.empty(0),
                 class_word=t.class_word) for t in tasks]
    fresh.load_state({k: v.clone() for k, v in m.state_dict().items()}, bare)
    return fresh


def _same_generation(a, b, task):
    assert np.array_equal(a.generate(task, 2, seed=3, steps=2), b.generate(task, 2, seed=3, steps=2))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    """Entries of ``module`` that differ from ``before`` (a grown token table: its pre-existing rows)."""
    return sorted(k for k, v in module.state_dict().items()
                  if k in before and not torch.equal(before[k], v[: before[k].shape[0]] if v.dim() else v))


def _batch(m, task, seed=7):
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return {"latents": lat, "prompts": [m.prompt(task)] * 2, "generator": torch.Generator().manual_seed(seed), "task": task}


# ----------------------------------------------------------------------------------- textual inversion
def test_textual_inversion_trains_only_its_row_and_resumes(backbone):
    m = _method(backbone, "textual_inversion")
    t1, t2 = _task(1, m.model.image_size), _task(2, m.model.image_size)
    unet0, text0 = _snapshot(m.model.unet), _snapshot(m.model.text_encoder)
    emb_key = next(n for n, p in m.model.text_encoder.named_parameters() if p is m.model.token_embeddings())
    meta = train_one_task(m, t1, seed=0)
    assert meta["N_train"] == m.model.token_embeddings().shape[1] == m.n_stored()
    assert _changed(unet0, m.model.unet) == []  # UNet bit-identical
    assert _changed(text0, m.model.text_encoder) == []  # every weight and pre-existing row bit-identical
    text1 = m.model.text_encoder.state_dict()
    assert text1[emb_key].shape[0] == text0[emb_key].shape[0] + 1
    g = torch.Generator().manual_seed(0 * 1000 + 1)  # T2IMethod.begin_task's random init of the row
    init_row = torch.randn(text1[emb_key].shape[1], generator=g) * text0[emb_key].std().item()
    assert not torch.allclose(text1[emb_key][m.token_id], init_row)  # the concept row moved
    fresh = _resume(backbone, m, "textual_inversion", [t1])
    assert torch.equal(fresh.model.token_embeddings(), m.model.token_embeddings())
    _same_generation(m, fresh, t1)
    # the equation: the loss is the plain diffusion loss of the prompt, and only the new row gets a gradient
    fresh.settings.init_from_class_word = True  # (the paper's init: the class word's embedding)
    fresh.begin_task(t2)
    word_ids = fresh.model.tokenizer("person", add_special_tokens=False).input_ids
    assert torch.equal(fresh.emb[fresh.token_id].detach(), fresh.emb[word_ids].detach().mean(0))
    out = fresh.loss(_batch(fresh, t2))
    ref = fresh.model.diffusion_loss(_batch(fresh, t2)["latents"], fresh.model.encode_text([t2.prompt] * 2),
                                     generator=torch.Generator().manual_seed(7))
    assert torch.equal(out["loss"], ref)
    out["loss"].backward()
    grad = fresh.emb.grad
    assert grad[fresh.token_id].abs().sum() > 0 and grad[: fresh.token_id].abs().sum() == 0
    assert all(p.grad is None for p in fresh.model.unet.parameters())


# ----------------------------------------------------------------------------------- dreambooth
def test_dreambooth_loss_is_instance_plus_weighted_prior_and_resumes(backbone):
    kw = {"prior_weight": 0.5, "n_class_images": 2, "class_sample_steps": 2}
    m = _method(backbone, "dreambooth", **kw)
    t1, t2 = _task(1, m.model.image_size), _task(2, m.model.image_size)
    unet0, vae0, text0 = _snapshot(m.model.unet), _snapshot(m.model.vae), _snapshot(m.model.text_encoder)
    n_unet = sum(p.numel() for p in m.model.unet.parameters())
    meta = train_one_task(m, t1, seed=0)
    assert meta["N_train"] == n_unet and meta["N_store"] == n_unet + m.model.token_embeddings().shape[1]
    assert len(_changed(unet0, m.model.unet)) > len(unet0) // 2  # the whole UNet trains
    assert _changed(vae0, m.model.vae) == [] and _changed(text0, m.model.text_encoder) == []
    fresh = _resume(backbone, m, "dreambooth", [t1], **kw)
    assert _changed(_snapshot(m.model.unet), fresh.model.unet) == []
    _same_generation(m, fresh, t1)
    # the equation on the resumed model's next task: instance term + prior_weight * prior term
    fresh.begin_task(t2)
    assert fresh.prior[0].shape[0] == 2  # n_class_images latents, encoded once
    out = fresh.loss(_batch(fresh, t2))
    g = torch.Generator().manual_seed(7)  # replay the batch generator by hand
    inst = fresh.model.diffusion_loss(_batch(fresh, t2)["latents"], fresh.model.encode_text([t2.prompt] * 2), generator=g)
    idx = torch.randint(0, 2, (2,), generator=g)
    lat = fresh.model.sample_latents(fresh.prior[0][idx], fresh.prior[1][idx], g)
    prior = fresh.model.diffusion_loss(lat, fresh.model.encode_text(["a photo of a person"] * 2), generator=g)
    assert torch.allclose(out["instance"], inst) and torch.allclose(out["prior"], prior)
    assert torch.allclose(out["loss"], inst + 0.5 * prior)
    with pytest.raises(UserError, match="class word"):
        fresh._make_prior(Task(index=3, concept="c3", token="<v3>", prompt="a photo of <v3>", images=t1.images))


@pytest.mark.parametrize("source", ["base", "current"])
def test_dreambooth_class_images_from_the_base_model_once(backbone, source):
    """prior_source base (DreamBooth): the class latents of task 2 are task 1's, generated by the base model, and
    survive resume through the checkpoint; current: regenerated by the fine-tuned model at task 2."""
    kw = {"n_class_images": 2, "class_sample_steps": 2, "prior_source": source}
    m = _method(backbone, "dreambooth", **kw)
    t1, t2 = _task(1, m.model.image_size), _task(2, m.model.image_size)
    base = _method(backbone, "dreambooth", **kw)
    base.begin_task(t1)  # the base model's class latents, by the same seeded draw
    expected = base.prior[0].clone()
    train_one_task(m, t1, seed=0)
    fresh = _resume(backbone, m, "dreambooth", [t1], **kw)
    fresh.begin_task(t2)
    assert torch.equal(m.prior[0], expected) if source == "base" else m.prior is None
    assert torch.equal(fresh.prior[0], expected) == (source == "base")
    assert fresh.n_stored() == m.n_stored()  # the class latents are not counted as parameters
    with pytest.raises(UserError, match="prior_source"):
        _method(backbone, "dreambooth", prior_source="first").begin_task(_task(1, m.model.image_size))


# ----------------------------------------------------------------------------------- custom diffusion
def test_first_token_detach_keeps_values_and_drops_its_gradient():
    lin = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # batch 1, tokens 2 (token 0 = start of text), width 2
    h = lin.register_forward_hook(_detach_first_token)
    y = lin(x)
    h.remove()
    assert torch.equal(y, torch.tensor([[[1.0, 3.0], [2.0, 4.0]]]))  # K = W c, unchanged
    y.sum().backward()
    # only token 1 (c = e_2) contributes: dL/dW = sum_tokens>0 1 * c^T = [[0, 1], [0, 1]]
    assert torch.equal(lin.weight.grad, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_custom_diffusion_changes_only_cross_attention_kv_and_resumes(backbone):
    m = _method(backbone, "custom_diffusion")
    t1 = _task(1, m.model.image_size)
    unet0, vae0 = _snapshot(m.model.unet), _snapshot(m.model.vae)
    meta = train_one_task(m, t1, seed=0)
    kv = cross_attention_kv(m.model.unet)
    changed = _changed(unet0, m.model.unet)
    assert changed and all(k.rsplit(".", 1)[0] in kv and k.endswith("weight") for k in changed)
    assert _changed(vae0, m.model.vae) == []
    n_kv = sum(mod.weight.numel() for mod in kv.values())
    width = m.model.token_embeddings().shape[1]
    assert meta["N_train"] == n_kv + width and meta["N_store"] == n_kv + width
    assert not m._hooks  # the detach hooks are gone after the task
    fresh = _resume(backbone, m, "custom_diffusion", [t1])
    assert _changed(_snapshot(m.model.unet), fresh.model.unet) == []
    _same_generation(m, fresh, t1)


# ----------------------------------------------------------------------------------- EWC
def test_ewc_penalty_by_hand():
    f = {"w": torch.tensor([[1.0, 2.0], [0.0, 4.0]])}
    anchor = {"w": torch.zeros(2, 2)}
    theta = {"w": torch.tensor([[1.0, -1.0], [3.0, 0.5]])}
    # 1*1 + 2*1 + 0*9 + 4*0.25
    assert ewc_penalty(theta, anchor, f).item() == pytest.approx(4.0)


def test_custom_diffusion_ewc_fisher_penalty_and_resume(backbone):
    kw = {"fisher_samples": 2, "ewc_lambda": 10.0}
    m = _method(backbone, "custom_diffusion_ewc", **kw)
    t1, t2, t3 = (_task(i, m.model.image_size) for i in (1, 2, 3))
    train_one_task(m, t1, seed=0)
    f1 = {n: f.clone() for n, f in m.fisher.items()}
    assert set(f1) == set(m.kv) and all((f >= 0).all() for f in f1.values()) and any(f.sum() > 0 for f in f1.values())
    assert all(torch.equal(m.anchor[n], w) for n, w in m.kv_weights().items())
    # task 2 through the engine's loop from a restored model: Fisher and anchor restored, then accumulated
    m2 = _resume(backbone, m, "custom_diffusion_ewc", [t1], **kw)
    assert all(torch.equal(m2.fisher[n], f1[n]) and torch.equal(m2.anchor[n], m.anchor[n]) for n in f1)
    train_one_task(m2, t2, seed=0)
    f2 = m2.task_fisher(t2)  # same generator seed: the task-2 Fisher at the final weights
    assert all(torch.allclose(m2.fisher[n], f1[n] + f2[n]) for n in f1)  # F = F_1 + F_2
    m3 = _resume(backbone, m2, "custom_diffusion_ewc", [t1, t2], **kw)
    assert all(torch.equal(m3.fisher[n], m2.fisher[n]) for n in f1)
    _same_generation(m2, m3, t1)
    # the loss term: lambda/2 * F (theta - theta*)^2 with a hand-set Fisher on one weight element
    m3.begin_task(t3)
    name = next(iter(m3.kv))
    m3.fisher = {n: torch.zeros_like(f) for n, f in m3.fisher.items()}
    m3.fisher[name][0, 0] = 2.0
    with torch.no_grad():
        m3.kv_weights()[name][0, 0] += 0.1
    out = m3.loss(_batch(m3, t3))
    assert out["penalty"].item() == pytest.approx(2.0 * 0.1 ** 2, rel=1e-4)
    base = super(type(m3), m3).loss(_batch(m3, t3))["loss"]  # custom_diffusion's loss, same batch
    assert out["loss"].item() == pytest.approx(base.item() + 10.0 / 2 * out["penalty"].item(), rel=1e-5)


# ----------------------------------------------------------------------------------- C-LoRA
# the penalty's equation and the sum of products: tests/test_lora_toolkit.py
def test_c_lora_trains_two_tasks_with_penalty_and_resumes(backbone):
    kw = {"rank": 2, "lam": 10.0}
    m = _method(backbone, "c_lora", **kw)
    t1, t2, t3 = (_task(i, m.model.image_size) for i in (1, 2, 3))
    unet0 = _snapshot(m.model.unet)
    train_one_task(m, t1, seed=0)
    assert "penalty" not in m.loss(_batch(m, t1))  # task 1: no past, no penalty
    m2 = _resume(backbone, m, "c_lora", [t1], **kw)
    meta = train_one_task(m2, t2, seed=0)
    assert meta["N_store"] == 2 * meta["N_train"]
    m3 = _resume(backbone, m2, "c_lora", [t1, t2], **kw)
    state2, state3 = m2.state_dict(), m3.state_dict()
    assert state2.keys() == state3.keys() and all(torch.equal(state2[k], state3[k]) for k in state2)
    # the resumed model folds A_2 B_2 into W (W_2 = W_1 + s B_2 A_2); the trained one still applies the adapter
    for n, (a, b, s) in lora_pairs(m2.model.unet).items():
        w2 = m2.model.unet.get_submodule(n).base_layer.weight + s * b @ a
        assert torch.allclose(m3.model.unet.get_submodule(n).weight, w2, atol=1e-6)
    g2, g3 = m2.generate(t2, 2, seed=3, steps=2), m3.generate(t2, 2, seed=3, steps=2)
    assert np.abs(g2.astype(int) - g3.astype(int)).max() <= 1  # same model up to float rounding
    changed = _changed(unet0, m3.model.unet)  # folded: only cross-attention K/V base weights moved
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    # the penalty at task 3, by hand: past = A_1 B_1 + A_2 B_2 (sum of the products)
    m3.begin_task(t3)
    past = {n: sum(lora_delta(e[f"{n}.A"], e[f"{n}.B"], e[f"{n}.scaling"].item()) for e in m2.past)
            for n in lora_pairs(m3.model.unet)}
    with torch.no_grad():  # pretend task 3 already wrote somewhere
        for a, b, _ in lora_pairs(m3.model.unet).values():
            b.normal_()
    out = m3.loss(_batch(m3, t3))
    by_hand = sum(((past[n].abs() * (b @ a) * s) ** 2).sum() for n, (a, b, s) in lora_pairs(m3.model.unet).items())
    assert out["penalty"].item() == pytest.approx(by_hand.item(), rel=1e-5) and out["penalty"] > 0
    base = super(type(m3), m3).loss(_batch(m3, t3))["loss"]
    assert out["loss"].item() == pytest.approx(base.item() + 10.0 * by_hand.item(), rel=1e-5)
