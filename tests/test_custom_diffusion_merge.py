"""custom_diffusion_merge: the closed form of Kumari et al. (2023, sec. 3.2) on small matrices, and on the model."""
import pytest
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method
from continual_bench.methods.t2i.custom_diffusion_merge import closed_form_merge, text_rows
from continual_bench.utils import UserError


def test_closed_form_by_hand():
    # C_reg = diag(1, 2) -> G = diag(1, 4); one constraint row c = (1, 1) with target 5; W0 = 0.
    # d = c G^-1 = (1, 1/4), d c^T = 5/4, v^T = (5 - 0) / (5/4) = 4, W = W0 + v^T d = (4, 1).
    w = closed_form_merge(torch.zeros(1, 2), torch.diag(torch.tensor([1.0, 2.0])), torch.tensor([[1.0, 1.0]]),
                          torch.tensor([[5.0]]))
    assert torch.allclose(w, torch.tensor([[4.0, 1.0]], dtype=torch.float64))
    # C_reg = I, W0 = I, c = (1, 0) -> target (2, 3): only the first column moves, W = [[2, 0], [3, 1]]
    w = closed_form_merge(torch.eye(2), torch.eye(2), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [3.0]]))
    assert torch.allclose(w, torch.tensor([[2.0, 0.0], [3.0, 1.0]], dtype=torch.float64))


def test_closed_form_constraint_exact_optimal_and_no_rows_is_w0():
    g = torch.Generator().manual_seed(0)
    w0, c_reg = torch.randn(3, 5, generator=g), torch.randn(9, 5, generator=g)
    c, v = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    w = closed_form_merge(w0, c_reg, c, v)
    assert torch.allclose(w @ c.double().T, v.double(), atol=1e-10)  # W C^T = V exactly
    obj = lambda x: ((x - w0.double()) @ c_reg.double().T).pow(2).sum()  # noqa: E731
    # any other feasible W = W + N with N C^T = 0 is worse
    null = torch.linalg.svd(c.double()).Vh[2:]  # rows orthogonal to C's rows
    for _ in range(5):
        n = torch.randn(3, 3, generator=g).double() @ null
        assert obj(w + 0.1 * n) > obj(w)
    assert torch.equal(closed_form_merge(w0, c_reg, torch.empty(0, 5), torch.empty(3, 0)), w0.double())
    with pytest.raises(UserError, match="too few directions.*ridge"):  # G singular: a clear error, not garbage
        closed_form_merge(w0, c_reg[:3], c, v)
    w = closed_form_merge(w0, c_reg[:3], c, v, ridge=1e-6)  # the ridge changes the objective, not the constraint
    assert torch.allclose(w @ c.double().T, v.double(), atol=1e-8)


def test_merged_model_keeps_each_concepts_outputs(tiny_pipeline):
    cls = get_method("t2i", "custom_diffusion_merge")
    # the random-weight test encoder spans few directions with 5 captions: a small ridge keeps G invertible
    m = cls(T2IModel.from_pretrained(tiny_pipeline), build_settings(cls.Settings, {"ridge": 1e-4}, "t"), seed=0)
    captions = [f"a photo of a person with {c} hair" for c in ("red", "long black", "short blonde", "white", "brown")]
    tasks = [Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>", images=torch.empty(0),
                  class_word="person", class_captions=captions) for i in (1, 2)]
    g = torch.Generator().manual_seed(0)
    fine_tuned = []
    for t in tasks:
        t.past = tasks[: t.index - 1]
        m.begin_task(t)
        name, mod = next(iter(m.kv.items()))
        assert torch.equal(mod.weight, m.w_init[name])  # every concept starts from the base weights
        with torch.no_grad():  # "fine-tuning"
            for mm in m.kv.values():
                mm.weight += 0.05 * torch.randn(mm.weight.shape, generator=g)
        fine_tuned.append({n: mm.weight.detach().clone() for n, mm in m.kv.items()})
        m.end_task(t)
    for t, w_k in zip(tasks, fine_tuned):  # the merged W reproduces W_k on concept k's rows (<vk>, end of text)
        rows = text_rows(m.model, [t.prompt], [t.token])[0]
        assert rows.shape[0] == 2
        for n, mod in m.kv.items():
            assert torch.allclose(mod.weight @ rows.T, w_k[n] @ rows.T, atol=1e-4)
    assert m.n_stored() == 2 * m.n_trained()
