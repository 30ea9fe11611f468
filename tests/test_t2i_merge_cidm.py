"""The three merging baselines of Staniszewski et al. (arXiv 2410.04891) and CIDM (Dong et al., NeurIPS 2024): each
central equation on hand-made tensors, and through the method with hand-set LoRA factors (the engine's
fresh-model-per-task path)."""
import copy
import math

import pytest
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.lora import base_weight, lora_pairs
from continual_bench.methods.registry import get_method
from continual_bench.methods.t2i.cidm import consolidation_terms, ewa_weights
from continual_bench.methods.t2i.lora_merge_consecutive import consecutive_merge
from continual_bench.methods.t2i.lora_merge_magnitude import magnitude_merge
from continual_bench.methods.t2i.lora_merge_orthogonal import orthogonal_columns


# ----------------------------------------------------------------------------------- equations on hand-made tensors
def test_consecutive_merge_adds_the_products():
    d1, d2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]])
    assert torch.equal(consecutive_merge(None, d1), d1)
    assert torch.equal(consecutive_merge(d1, d2), torch.tensor([[1.5, 1.0]]))


def test_magnitude_merge_keeps_the_larger_magnitude_ties_to_the_new_task():
    tau = torch.tensor([1.0, -3.0, 2.0, 0.0])
    d = torch.tensor([-2.0, 1.0, -2.0, 0.5])
    assert torch.equal(magnitude_merge(tau, d), torch.tensor([-2.0, -3.0, -2.0, 0.5]))  # |-2| = |2|: the new one
    assert torch.equal(magnitude_merge(None, d), d)


def test_orthogonal_columns_are_unit_and_orthogonal_column_by_column():
    a = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]])  # r = 2, in = 3: columns e1, 2 e2, (3, 4)
    o = orthogonal_columns(a)
    assert o.shape == a.shape
    assert torch.allclose(o.abs(), torch.tensor([[0.0, 1.0, 0.8], [1.0, 0.0, 0.6]]), atol=1e-6)
    assert torch.allclose((o * a).sum(0), torch.zeros(3), atol=1e-6) and torch.allclose(o.norm(dim=0), torch.ones(3))


def test_cidm_consolidation_terms():
    b_new = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]  # one layer, out 2, r 2
    b_old = [[torch.tensor([[1.0, 1.0], [0.0, 0.0]])], [torch.tensor([[0.0, 0.0], [0.0, 1.0]])]]  # two old tasks
    orth, enh = consolidation_terms(b_new, b_old)
    # B B_1^T = [[1, 0], [2, 0]] -> mean |.| 0.75; B B_2^T = [[0, 0], [0, 2]] -> 0.5; mean over tasks 0.625
    assert math.isclose(orth.item(), 0.625) and math.isclose(enh.item(), (0 + 1 + 1 + 1) / 4)


def test_cidm_ewa_weights():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two prompt rows
    c = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # concept 1 matches row 0 (cos 1); concept 2: cos 1/sqrt(2)
    g = ewa_weights(h, c, power=4.0)
    assert torch.allclose(g, torch.tensor([1.0, 0.25]) / 1.25)


# ----------------------------------------------------------------------------------- through the methods
@pytest.fixture(scope="module")
def proto(tiny_pipeline):
    """The tiny pipeline loaded once; every model is a deep copy (as a fresh from_pretrained, cheaper)."""
    return T2IModel.from_pretrained(tiny_pipeline)


def _fresh(proto):
    return T2IModel(copy.deepcopy(proto.pipe), proto.device)


def _task(i):
    return Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>", images=torch.empty(0),
                class_word="person")


def _run(pipe, name, set_pair, **kw):
    """Two tasks, a fresh model each, with the trained pair of task k set by ``set_pair(k, A, B)``; returns the method
    resumed after task 2's state, the live one after task 2, and the first adapted module's name."""
    cls = get_method("t2i", name)
    settings = build_settings(cls.Settings, {"rank": 2, "alpha": 2.0, **kw}, name)  # scaling 1
    tasks, state = [_task(1), _task(2)], {}
    for k, t in enumerate(tasks, start=1):
        m = cls(_fresh(pipe), settings, seed=0)
        m.load_state(state, tasks[: k - 1])
        m.begin_task(t)
        pairs = lora_pairs(m.model.unet, m.adapter)
        with torch.no_grad():
            for a, b, _ in pairs.values():
                set_pair(k, a, b)
        m.end_task(t)
        state = m.state_dict()
    fresh = cls(_fresh(pipe), settings, seed=0)
    fresh.load_state(state, tasks)
    return fresh, m, next(iter(pairs))


def _w(m, name):
    return base_weight(m.model.unet.get_submodule(name)).detach().clone()


def _w0(pipe, name):
    return base_weight(pipe.unet.get_submodule(name)).detach().clone()


def _hand_pair(k, a, b):
    a.zero_()[:, 0] = 1.0  # B A = k * (number of ones) in column 0 ...
    b.zero_()[0, :] = float(k) * (1 if k == 1 else -1)  # ... of row 0: task 1 writes +2, task 2 writes -4


def test_consecutive_and_magnitude_methods_fold_as_their_equations(proto):
    for name, expected in (("lora_merge_consecutive", 2.0 - 4.0), ("lora_merge_magnitude", -4.0)):
        fresh, live, mod = _run(proto, name, _hand_pair)
        want = _w0(proto, mod)
        want[0, 0] += expected
        assert torch.allclose(_w(fresh, mod), want, atol=1e-6), name
        assert torch.equal(_w(fresh, mod), _w(live, mod)), name  # live and resumed: the same bits
        assert sorted(k for k in fresh.state_dict() if k.startswith("task")) == ["task1.token", "task2.token"]


def test_orthogonal_method_inits_a_orthogonally_and_passes_the_product_of_sums(proto):
    seen = {}

    def pair(k, a, b):
        seen[k] = a.detach().clone()  # task 2: the orthogonal init, before "training"
        if k == 1:
            a.zero_()[:, 0] = 1.0
        b.zero_()[0, :] = 1.0  # B_k: ones in row 0; A_2 keeps its orthogonal init

    fresh, live, mod = _run(proto, "lora_merge_orthogonal", pair)
    a1 = torch.zeros_like(seen[2])
    a1[:, 0] = 1.0
    assert torch.allclose((seen[2] * a1).sum(0), torch.zeros(a1.shape[1]), atol=1e-6)  # column-wise orthogonal
    assert torch.allclose(seen[2].norm(dim=0), torch.ones(a1.shape[1]), atol=1e-6)
    b = torch.zeros(_w0(proto, mod).shape[0], 2)
    b[0, :] = 1.0
    want = _w0(proto, mod) + (b + b) @ (a1 + seen[2])  # W_0 + (B1 + B2)(A1 + A2): cross terms included
    assert torch.allclose(_w(fresh, mod), want, atol=1e-5) and torch.equal(_w(fresh, mod), _w(live, mod))


def test_cidm_generation_uses_the_ewa_aggregate(proto):
    def pair(k, a, b):
        a.zero_()[:, 0] = 1.0
        b.zero_()[0, :] = float(k)  # s B_k A_k = 2k at [0, 0]

    fresh, _live, mod = _run(proto, "cidm", pair)
    w0 = _w(fresh, mod)
    assert torch.equal(w0, _w0(proto, mod))
    gamma = fresh.ewa("a photo of <v2>")
    assert math.isclose(gamma.sum().item(), 1.0, rel_tol=1e-6) and gamma.shape == (2,)
    with fresh.weights_for("a photo of <v2>"):
        got = _w(fresh, mod)
    want = w0.clone()
    want[0, 0] += 0.8 * (gamma[0] * 2 + gamma[1] * 4)
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(_w(fresh, mod), w0)
