"""SimpleCIL, APER, RanPAC, InfLoRA (issue 19): each method's central equation on hand-made tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from continual_bench.methods.registry import get_method, list_methods
from continual_bench.utils import UserError

from test_cls_methods import batch, make, tasks

NEW = ["simplecil", "aper", "ranpac", "inflora"]


def images_of(*batches):
    """What the engine hands to before_training / after_training: a callable returning a fresh iterator."""
    return lambda: iter(batches)


def feature_stub(m, table):
    """Replace the method's backbone reading by a lookup: image i (x[:, 0, 0, 0] = i) has feature table[i]."""
    def lookup(x, *args, **kwargs):
        return table[x[:, 0, 0, 0].long()]
    return lookup


def codes(*ids):
    x = torch.zeros(len(ids), 3, 16, 16)
    x[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    return x


def test_new_methods_registered_with_papers_and_docstrings():
    names = {m["name"]: m for m in list_methods() if m["track"] == "cls"}
    for n in NEW:
        assert n in names and names[n]["paper"], n
        doc = get_method("cls", n).__doc__
        assert "github.com/" in doc and "Against the authors' code" in doc, n


# ------------------------------------------------------------------------------------------- SimpleCIL
def test_simplecil_prototypes_are_class_means_and_logits_are_cosines():
    from continual_bench.methods.cls.simplecil import cosine_logits

    m = make("simplecil")  # 4 classes, 2 tasks, width 16
    t1, t2 = tasks()
    assert m.param_groups() == [] and m.n_trained() == 0  # the engine takes no optimizer step
    table = torch.zeros(6, 16)
    table[0, :2] = torch.tensor([1.0, 0.0])   # class 0: images 0, 1 -> mean (2, 1)
    table[1, :2] = torch.tensor([3.0, 2.0])
    table[2, :2] = torch.tensor([0.0, 4.0])   # class 1: image 2 -> (0, 4)
    table[3, :2] = torch.tensor([-1.0, -1.0])  # class 2 (task 2): (-1, -1)
    table[4, :2] = torch.tensor([2.0, 2.0])  # class 3 (task 2): (2, 2)
    m.features = feature_stub(m, table)
    m.begin_task(t1)
    m.after_training(t1, images_of((codes(0, 1), torch.tensor([0, 0])), (codes(2), torch.tensor([1]))))
    P = m.head.weight
    torch.testing.assert_close(P[0, :2], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(P[1, :2], torch.tensor([0.0, 4.0]))
    assert P[2:].abs().sum() == 0
    # s_c(x) = cos(phi(x), p_c): a query (1, 2) -> cos with (2, 1) = 4/5, with (0, 4) = 2/sqrt5, unseen rows 0
    q = torch.zeros(1, 16)
    q[0, :2] = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(cosine_logits(q, P), torch.tensor([[0.8, 2 / math.sqrt(5), 0.0, 0.0]]))
    m.end_task(t1)
    # task 2 adds its rows and leaves the old ones untouched; the state round-trips
    m.begin_task(t2)
    m.after_training(t2, images_of((codes(3, 4), torch.tensor([2, 3]))))
    torch.testing.assert_close(P[2:, :2], torch.tensor([[-1.0, -1.0], [2.0, 2.0]]))
    torch.testing.assert_close(P[0, :2], torch.tensor([2.0, 1.0]))
    assert m.n_stored() == 4 * 16
    m2 = make("simplecil")
    m2.load_state(m.state_dict(), [t1, t2])
    torch.testing.assert_close(m2.head.weight, P)
    with pytest.raises(ValueError, match="labels outside"):
        m.after_training(t1, images_of((codes(0), torch.tensor([3]))))
    with pytest.raises(ValueError, match="no training image"):
        m.after_training(t1, images_of((codes(0), torch.tensor([0]))))


def test_simplecil_logits_use_the_frozen_backbone():
    m = make("simplecil")
    t1, _ = tasks()
    b = batch(t1)
    m.begin_task(t1)
    m.after_training(t1, images_of((b["x"], b["y"])))
    feats = m.backbone(b["x"])
    expected = F.normalize(feats, dim=1) @ F.normalize(m.head.weight, dim=1).T
    torch.testing.assert_close(m.logits(b["x"]), expected)


# ------------------------------------------------------------------------------------------- APER
def test_aper_adapter_is_adaptformers_parallel_branch():
    """x_out = x_mid + MLP(LN2(x_mid)) + s * W_up ReLU(W_down x_mid + b_down) + s * b_up (x_mid = after attention)."""
    m = make("aper", adapter_dim=3, adapter_scale=0.1)
    blk = m.backbone.vit.blocks[0]
    ad = m.petl.adapters[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ad.up.weight.copy_(torch.randn(16, 3, generator=g))
        ad.up.bias.copy_(torch.randn(16, generator=g))
    m.eval()
    x = torch.randn(2, 5, 16, generator=g)
    m.petl.enabled = False  # the reference pieces, computed without the hooks
    x_mid = x + blk.attn(blk.norm1(x))
    plain = x_mid + blk.mlp(blk.norm2(x_mid))
    expected = plain + 0.1 * (ad.up(F.relu(ad.down(x_mid))))
    torch.testing.assert_close(blk(x), plain)  # hooks off: the pretrained block
    m.petl.enabled = True
    torch.testing.assert_close(blk(x), expected)  # hooks on: the adapted block
    assert not torch.allclose(expected, plain)
    # W_up = 0 at the start: the adapted ViT starts equal to the frozen one
    fresh = make("aper")
    xx = torch.rand(2, 3, 16, 16)
    fresh.eval()
    torch.testing.assert_close(fresh.adapted_features(xx), fresh.frozen_features(xx))


def test_aper_concatenated_prototypes_and_first_task_only_tuning():
    m = make("aper", adapter_dim=4)
    t1, t2 = tasks()
    m.begin_task(t1)
    groups = m.param_groups()
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in m.petl.parameters()} | {id(p) for p in m.train_head.parameters()}
    assert not any(id(p) in ids for p in m.backbone.parameters())
    # one optimizer step moves the adapter away from the frozen ViT
    opt = torch.optim.Adam([p for g in groups for p in g["params"]], lr=1e-2)
    m.train()
    b = batch(t1)
    out = m.loss(b)
    assert set(out) == {"ce", "loss"}
    out["loss"].backward()
    opt.step()
    m.eval()
    m.after_training(t1, images_of((b["x"], b["y"])))
    z = torch.cat([m.frozen_features(b["x"]), m.adapted_features(b["x"])], 1)  # [phi, phi*]
    assert not torch.allclose(z[:, :16], z[:, 16:])
    for c in (0, 1):
        torch.testing.assert_close(m.head.weight[c], z[b["y"] == c].mean(0))
    expected = F.normalize(z, dim=1) @ F.normalize(m.head.weight, dim=1).T
    torch.testing.assert_close(m.logits(b["x"]), expected)
    m.end_task(t1)
    # task 2: nothing trains; the adapter is restored from the state
    m2 = make("aper", adapter_dim=4)
    m2.load_state(m.state_dict(), [t1])
    m2.begin_task(t2)
    assert m2.param_groups() == [] and m2.n_trained() == 0
    m2.eval()
    torch.testing.assert_close(m2.features(b["x"]), z)
    assert m2.n_stored() == sum(p.numel() for p in m2.petl.parameters()) + 2 * 32


def test_aper_ssf_scales_and_shifts_every_target():
    from continual_bench.methods.cls.aper import ssf_targets

    m = make("aper", petl="ssf")
    vit = m.backbone.vit
    assert len(ssf_targets(vit)) == 2 + 6 * len(vit.blocks)
    qkv = vit.blocks[0].attn.qkv
    x = torch.randn(2, 5, 16)
    gamma, beta = m.petl.gamma["blocks_0_attn_qkv"], m.petl.beta["blocks_0_attn_qkv"]
    assert gamma.shape == (48,)
    torch.testing.assert_close(qkv(x), F.linear(x, qkv.weight, qkv.bias) * gamma + beta)
    m.petl.enabled = False
    torch.testing.assert_close(qkv(x), F.linear(x, qkv.weight, qkv.bias))


# ------------------------------------------------------------------------------------------- RanPAC
def test_ranpac_ridge_solution_and_lambda_selection_by_hand():
    from continual_bench.methods.cls.ranpac import ridge_solve, select_ridge

    H = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    G, C = H.T @ H, H.T @ Y  # G = [[2, 1], [1, 5]], C = [[2, 0], [1, 2]]
    # (G + I)^-1 = [[6, -1], [-1, 3]] / 17 -> W = [[11, -2], [1, 6]] / 17
    W = ridge_solve(G, C, 1.0)
    torch.testing.assert_close(W, torch.tensor([[11.0, -2.0], [1.0, 6.0]], dtype=torch.float64) / 17)
    # G and C accumulated task by task give the joint solution
    W2 = ridge_solve(H[:2].T @ H[:2] + H[2:].T @ H[2:], H[:2].T @ Y[:2] + H[2:].T @ Y[2:], 1.0)
    torch.testing.assert_close(W2, W)
    # selection: fit on the first 2 rows, score on the third; a tiny lambda reproduces y = (1, 0) at h = (1, 1)?
    # W(lam) = diag(1/(1+lam), 2/(4+lam)) on rows (1,0),(0,2): pred(1,1) = (1/(1+lam), 2/(4+lam)); error vs (1, 0)
    grid = [1e-8, 1.0, 1e8]
    lam, losses = select_ridge(H, Y, grid, 2)
    expect = [((1 / (1 + g) - 1) ** 2 + (2 / (4 + g)) ** 2) / 2 for g in grid]
    assert losses == pytest.approx(expect)
    assert lam == grid[min(range(3), key=lambda i: expect[i])]
    # a non-finite error is never chosen
    Hn = H.clone()
    Hn[2, 0] = float("nan")
    lam_n, losses_n = select_ridge(Hn, Y, grid, 2)
    assert all(v == math.inf for v in losses_n) and lam_n == grid[0]


def test_ranpac_head_is_the_ridge_classifier_on_relu_projections():
    m = make("ranpac", petl="none", rp_dim=3, ridge=0.5)
    t1, t2 = tasks()
    assert m.param_groups() == [] and m.tuning is False
    table = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    m.adapted_features = feature_stub(m, table)
    m.begin_task(t1)
    y1 = torch.tensor([0, 1, 0, 1])
    m.after_training(t1, images_of((codes(0, 1, 2, 3), y1)))
    W = m.W_rand
    assert W.shape == (16, 3) and W.abs().sum() > 0  # drawn after the first task
    H1 = F.relu(table[:4] @ W).double()
    Y1 = F.one_hot(y1, 4).double()
    G = H1.T @ H1 + 0.5 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(m.W_out, torch.linalg.solve(G, H1.T @ Y1).float())
    x = codes(4, 5)
    torch.testing.assert_close(m.logits(x), F.relu(table[4:6] @ W) @ m.W_out)
    m.end_task(t1)
    # task 2 (after a state round trip): G, C accumulate; W is not redrawn
    m2 = make("ranpac", petl="none", rp_dim=3, ridge=0.5)
    m2.adapted_features = feature_stub(m2, table)
    m2.load_state(m.state_dict(), [t1])
    torch.testing.assert_close(m2.W_rand, W)
    m2.begin_task(t2)
    y2 = torch.tensor([2, 3, 3])
    m2.after_training(t2, images_of((codes(4, 5, 6), y2)))
    H = torch.cat([H1, F.relu(table[4:7] @ W).double()])
    Y = torch.cat([Y1, F.one_hot(y2, 4).double()])
    expected = torch.linalg.solve(H.T @ H + 0.5 * torch.eye(3, dtype=torch.float64), H.T @ Y).float()
    torch.testing.assert_close(m2.W_out, expected, rtol=1e-5, atol=1e-5)  # G stored in float32 between tasks
    assert float(m2.state_dict()["rp.lambda"]) == 0.5


def test_ranpac_first_task_petl_then_frozen():
    m = make("ranpac", petl="adapter", adapter_dim=2, rp_dim=4)
    t1, t2 = tasks()
    m.begin_task(t1)
    assert m.tuning and m.n_trained() == sum(p.numel() for p in m.petl.parameters()) + 4 * 16 + 1
    m.train()
    assert m.loss(batch(t1))["loss"].requires_grad
    m.eval()
    b = batch(t1, n=10)
    m.after_training(t1, images_of((b["x"], b["y"])))  # ridge selected on an 8 / 2 split
    assert 1e-8 <= float(m.lam) <= 1e8
    m.end_task(t1)
    m.begin_task(t2)
    assert m.param_groups() == []
    with pytest.raises(UserError, match="ridge_exp_min"):
        make("ranpac", ridge_exp_min=3, ridge_exp_max=2)


# ------------------------------------------------------------------------------------------- InfLoRA
def test_inflora_designed_A_is_orthogonal_to_the_protected_subspace():
    from continual_bench.methods.cls.inflora import design_A

    # Sigma = diag(9, 4, 1, 0.25); protected subspace M = span(e1)
    cov = torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.25]))
    A1 = design_A(cov, None, False, 2)  # first task: top-2 eigenvectors e1, e2, / sqrt3
    torch.testing.assert_close(A1.abs(), torch.eye(4)[:2] / math.sqrt(3))
    M = torch.eye(4)[:, :1].double()
    A = design_A(cov, M, False, 2)  # (I - M M^T) Sigma = diag(0, 4, 1, .25): e2, e3
    torch.testing.assert_close(A.abs(), torch.eye(4)[1:3] / math.sqrt(3))
    torch.testing.assert_close(A.double() @ M, torch.zeros(2, 1, dtype=torch.float64))
    # DualGPM's 'retain' form with P = M-perp gives the same rows
    P = torch.eye(4)[:, 1:].double()
    torch.testing.assert_close(design_A(cov, P, True, 2).abs(), A.abs())


def test_inflora_dual_gpm_threshold_by_hand():
    from continual_bench.methods.cls.inflora import dual_gpm_update

    # eigenvalues 10, 5, 1, 0 (squared 100, 25, 1, 0; total 126): cumulative ratios .794, .992, 1.0
    act = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.0]))
    basis, retain = dual_gpm_update(act, None, False, 0.98)
    assert basis.shape == (4, 1) and not retain  # #{.794 < .98} = 1
    basis, retain = dual_gpm_update(act, None, False, 0.995)
    assert basis.shape == (4, 2) and not retain  # .794, .992 < .995
    # 'remove' update: a new task with energy on e2, e3: act = diag(0, 3, 4, 0); in span(e1): 0 -> add 4 (.64), then
    # 3 (1.0 >= .98): M = [e1, e3, e2] (3 > D/2 = 2 columns -> stored as its complement e4, 'retain')
    M = torch.eye(4)[:, :1].double()
    basis, retain = dual_gpm_update(torch.diag(torch.tensor([0.0, 3.0, 4.0, 0.0])), M, False, 0.98)
    assert retain and basis.shape == (4, 1)
    torch.testing.assert_close(basis.abs(), torch.eye(4, dtype=torch.float64)[:, 3:])
    # 'retain' update: free space P = span(e3, e4), new energy 4 on e3, 1 on e4 (total 17 with 12 on e1... )
    P = torch.eye(4)[:, 2:].double()
    act = torch.diag(torch.tensor([4.0, 0.0, 1.0, 0.5]))  # squares 16, 0, 1, .25: total 17.25
    # in span(P): (1 + .25)/17.25 = .072 >= 1 - .98: remove e3 (-> .0145 < .02): P = span(e4)
    basis, retain = dual_gpm_update(act, P, True, 0.98)
    assert retain and basis.shape == (4, 1)
    torch.testing.assert_close(basis.abs(), torch.eye(4, dtype=torch.float64)[:, 3:])


def test_inflora_branch_only_on_k_v_and_only_B_trains():
    t1, t2 = tasks()
    m = make("inflora", rank=2)
    w = m.layers[0]
    assert len(m.layers) == 5 and m.backbone.vit.blocks[0].attn.qkv is w
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        w.A.copy_(torch.randn(2, 16, generator=g))
        w.B.copy_(torch.randn(32, 2, generator=g))
    base = F.linear(x, w.base.weight, w.base.bias)
    out = w(x)
    torch.testing.assert_close(out[:, :16], base[:, :16])  # queries unchanged
    torch.testing.assert_close(out[:, 16:], base[:, 16:] + x @ w.A.T @ w.B.T)  # [k; v] += B A x
    # only the B's and the head train
    ids = {id(p) for g_ in m.param_groups() for p in g_["params"]}
    assert ids == {id(v.B) for v in m.layers} | {id(p) for p in m.head.parameters()}
    assert "A" in dict(w.named_buffers())


def test_inflora_task_cycle_designs_A_from_inputs_and_merges_past_products():
    t1, t2 = tasks()
    m = make("inflora", rank=2)
    b1 = batch(t1, n=6)
    imgs = images_of((b1["x"], b1["y"]))
    m.begin_task(t1)
    m.eval()
    with torch.no_grad():
        m.before_training(t1, imgs)
    # A_1 = top-2 eigenvectors of layer 0's input covariance / sqrt3 (B = 0: the model is the pretrained ViT)
    captured = {}
    h = m.backbone.vit.blocks[0].norm1.register_forward_hook(lambda mod, a, o: captured.setdefault("x", o))
    m.backbone(b1["x"])
    h.remove()
    xs = captured["x"].reshape(-1, 16).double()
    cov = xs.T @ xs / len(xs)
    U = torch.linalg.svd(cov).U[:, :2]
    A = m.layers[0].A.double()
    torch.testing.assert_close((A.T @ A) * 3, U @ U.T, rtol=1e-5, atol=1e-6)  # same row space, norm 1/sqrt3
    # train B a little, then the DualGPM memory and the stored factors
    opt = torch.optim.Adam([p for g_ in m.param_groups() for p in g_["params"]], lr=1e-2)
    m.train()
    for _ in range(2):
        opt.zero_grad()
        m.loss(b1)["loss"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        m.after_training(t1, imgs)
    assert all(b is not None and b.shape[0] == 16 for b in m.basis)
    m.end_task(t1)
    state = m.state_dict()
    assert {"lora.001.00.A", "lora.001.00.B", "gpm.00.basis", "gpm.00.retain"} <= set(state)
    # a fresh method loading the state merges B_1 A_1 into the K/V rows and computes the same function
    m2 = make("inflora", rank=2)
    w0 = m2.layers[0].base.weight.detach().clone()
    m2.load_state(state, [t1])
    m2.begin_task(t2)  # B_2 = 0
    d = m2.layers[0].base.weight.detach() - w0
    assert d[:16].abs().sum() == 0
    torch.testing.assert_close(d[16:], state["lora.001.00.B"] @ state["lora.001.00.A"])
    m2.eval()
    torch.testing.assert_close(m2.logits(b1["x"]), m.logits(b1["x"]), rtol=1e-5, atol=1e-5)
    # task 2's A avoids task 1's protected subspace ('remove' form) or lies in the stored free space ('retain')
    b2 = batch(t2, n=6, seed=3)
    with torch.no_grad():
        m2.before_training(t2, images_of((b2["x"], b2["y"])))
    for i, w in enumerate(m2.layers):
        basis = m2.basis[i]
        A2 = w.A.double()
        if m2.retain[i]:
            torch.testing.assert_close(A2 @ basis @ basis.T, A2, atol=1e-5, rtol=0)
        else:
            zero = torch.zeros(2, basis.shape[1], dtype=torch.float64)
            torch.testing.assert_close(A2 @ basis, zero, atol=1e-5, rtol=0)


def test_inflora_threshold_schedule_and_errors():
    m = make("inflora", n_tasks=2)
    t1, t2 = tasks()
    assert m.threshold(t1) == pytest.approx(0.98) and m.threshold(t2) == pytest.approx(0.99)
    with pytest.raises(UserError, match="exceeds the ViT width"):
        make("inflora", rank=17)
    with pytest.raises(UserError, match="eps_first"):
        make("inflora", eps_first=0.99, eps_last=0.98)


@pytest.mark.parametrize("name", NEW)
def test_logits_and_passes_stay_fp32_under_bf16_autocast(name):
    """The engine runs the passes and evaluation under bf16 autocast on GPU (CPU autocast stands in here): prototypes,
    Gram matrices, covariances and logits stay fp32/fp64."""
    m = make(name, rank=2) if name == "inflora" else make(name)
    t1, _ = tasks()
    b = batch(t1, n=8)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    m.begin_task(t1)
    m.eval()
    with torch.no_grad(), bf16():
        m.before_training(t1, images_of((b["x"], b["y"])))
        m.after_training(t1, images_of((b["x"], b["y"])))
    m.end_task(t1)
    with torch.no_grad(), bf16():
        logits = m.logits(b["x"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    state = m.state_dict()
    assert all(v.dtype in (torch.float32, torch.float64, torch.int64) for v in state.values()), \
        {k: v.dtype for k, v in state.items()}
