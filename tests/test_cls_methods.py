"""Each classification method's distinctive mechanism, on small tensors with hand-computed expectations."""
import math

import pytest
import torch
import torch.nn.functional as F

from continual_bench.backbones.vit import ViTBackbone, build_vit, prefix_attention
from continual_bench.methods.base import build_settings
from continual_bench.methods.cls_base import ClsTask, cosine_factor, mask_past_logits
from continual_bench.methods.lora import base_weight, live_delta
from continual_bench.methods.registry import get_method, list_methods

ALL = ["upper_bound", "ft", "ft_pp", "lwf", "l2p", "l2p_pp", "dualprompt", "coda_p", "c_lora"]


def tiny_backbone(seed=0) -> ViTBackbone:
    torch.manual_seed(seed)
    vit = build_vit("toy_vit", dict(img_size=16, patch_size=4, embed_dim=16, depth=5, num_heads=2, mlp_ratio=2.0))
    bb = ViTBackbone(vit).eval()
    bb.requires_grad_(False)
    return bb


def make(name, n_classes=4, n_tasks=2, **settings):
    cls = get_method("cls", name)
    torch.manual_seed(1)
    return cls(tiny_backbone(), build_settings(cls.Settings, settings, name), seed=0, n_classes=n_classes,
               n_tasks=n_tasks)


def tasks(n_classes=4, n_tasks=2):
    k = n_classes // n_tasks
    out = []
    for i in range(n_tasks):
        out.append(ClsTask(index=i + 1, classes=list(range(i * k, (i + 1) * k)), lo=i * k, hi=(i + 1) * k,
                           n_tasks=n_tasks, past=list(out)))
    return out


def batch(task, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, 3, 16, 16, generator=g),
            "y": torch.randint(task.lo, task.hi, (n,), generator=g), "task": task}


def test_all_nine_methods_registered_with_papers():
    names = {m["name"]: m for m in list_methods() if m["track"] == "cls"}
    assert set(ALL) <= set(names) and all(names[n]["paper"] for n in ALL)
    for n in ALL:
        assert (get_method("cls", n).__doc__ or "").strip()


# ------------------------------------------------------------------------------------------- backbone
def test_backbone_without_prompts_equals_timm():
    bb = tiny_backbone()
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(bb(x), bb.vit.forward_features(x)[:, 0])


def test_prefix_attention_matches_a_naive_implementation():
    bb = tiny_backbone()
    attn = bb.vit.blocks[0].attn
    x, pk, pv = torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    H, hd = 2, 8
    q, k, v = attn.qkv(x).split(16, dim=-1)
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    heads = lambda t: t.reshape(2, -1, H, hd).transpose(1, 2)  # noqa: E731
    w = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    ref = attn.proj((w @ heads(v)).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(prefix_attention(attn, x, pk, pv), ref)


# ------------------------------------------------------------------------------------------- CODA-P
def test_coda_attention_weighted_component_sum():
    from continual_bench.methods.cls.coda_p import CodaPromptPool

    q = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    K = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    P = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[5.0, 5.0], [5.0, -5.0]]])
    prompt, alpha = CodaPromptPool.combine(q, K, A, P)
    # alpha_0 = cos(q*A_0 = [1,2], K_0 = [1,0]) = 1/sqrt5; alpha_1 = cos([2,0], [1,1]) = 1/sqrt2
    a0, a1 = 1 / math.sqrt(5), 1 / math.sqrt(2)
    torch.testing.assert_close(alpha, torch.tensor([[a0, a1]]))
    torch.testing.assert_close(prompt, (a0 * P[0] + a1 * P[1]).unsqueeze(0))


def test_coda_past_components_are_frozen():
    m = make("coda_p", pool=4, length=2, layers="0,1")
    t1, t2 = tasks()
    pool = m.pool
    assert pool.per_task == 2
    m.begin_task(t1)
    m.train()
    m.loss(batch(t1))["loss"].backward()
    g = pool.p_0.grad
    assert g[:2].abs().sum() > 0 and g[2:].abs().sum() == 0  # task 1 owns components 0-1
    m.end_task(t1)
    old = {n: p.detach().clone() for n, p in pool.named_parameters()}
    m.begin_task(t2)  # Gram-Schmidt init of components 2-3
    for n, p in pool.named_parameters():
        torch.testing.assert_close(p[:2], old[n][:2])
        flat = p.detach().reshape(4, -1)
        assert abs(float(flat[2] @ flat[0])) < 1e-5 and abs(float(flat[3].norm()) - 1) < 1e-5
    pool.zero_grad()
    opt = torch.optim.Adam([p for g in m.param_groups() for p in g["params"]], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m.loss(batch(t2))["loss"].backward()
        for n, p in pool.named_parameters():
            assert p.grad[:2].abs().sum() == 0, n  # past components: exactly zero gradient
            assert p.grad[2:].abs().sum() > 0, n
        opt.step()
    for n, p in pool.named_parameters():
        assert torch.equal(p[:2], old[n][:2])
    m.eval()  # evaluation uses all 4 components
    K, A, P = pool.tensors(0, train=False)
    assert len(K) == 4


def test_prompt_methods_train_prompts_and_head_only():
    for name in ("coda_p", "dualprompt", "l2p_pp", "l2p"):
        m = make(name)
        ids = {id(p) for g in m.param_groups() for p in g["params"]}
        assert not any(id(p) in ids for p in m.backbone.parameters()), name
        assert all(id(p) in ids for p in m.head.parameters())
        assert m.n_trained() > m.head.weight.numel()


# ------------------------------------------------------------------------------------------- L2P / L2P++ / DualPrompt
def test_l2p_top_k_key_matching_picks_the_most_similar_keys():
    from continual_bench.methods.cls.l2p_pp import top_k_keys

    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.1], [0.0, -1.0]])
    idx, sim = top_k_keys(q, keys, 2)
    # q0: cos = [0.995, 0.0995, -0.995, 0.677] -> keys 0, 3; q1: cos = [0, -1, 0, -0.8] -> keys 0/2 (tie)
    assert idx[0].tolist() == [0, 3]
    assert set(idx[1].tolist()) == {0, 2}
    torch.testing.assert_close(sim[0], torch.tensor([1 / math.sqrt(1.01), (0.6 + 0.08) / math.sqrt(1.01)]))


def test_l2p_pp_prefix_is_the_chosen_prompts_halves():
    m = make("l2p_pp", pool=4, length=4, top_k=2)
    P = m.net["prompt"]
    with torch.no_grad():
        P.k_0.copy_(torch.eye(4, 16))
    q = torch.zeros(1, 16)
    q[0, 2], q[0, 0] = 1.0, 0.5  # closest keys: 2 then 0
    pk, pv = m.prefixes(q, train=False)[0]
    torch.testing.assert_close(pk, torch.cat([P.p_0[2, :2], P.p_0[0, :2]]).unsqueeze(0))
    torch.testing.assert_close(pv, torch.cat([P.p_0[2, 2:], P.p_0[0, 2:]]).unsqueeze(0))
    m._aux = []
    m.prefixes(q, train=True)
    torch.testing.assert_close(m._aux[0], torch.tensor(2 - (1 / math.sqrt(1.25) + 0.5 / math.sqrt(1.25))))


def test_dualprompt_trains_the_task_prompt_and_matches_among_seen_tasks():
    m = make("dualprompt", n_tasks=2)
    t1, t2 = tasks()
    m.begin_task(t2)
    m._aux = []
    q = torch.randn(3, 16)
    assert m.select(q, 2, train=True).tolist() == [1, 1, 1]
    P = m.net["prompt"]
    with torch.no_grad():
        P.k_2.copy_(torch.stack([q[0], -q[0]]))
    assert m.select(q[:1], 2, train=False).tolist() == [0]
    m.task_id = 0  # after task 1 only the first E-prompt exists
    assert m.select(-q[:1], 2, train=False).tolist() == [0]
    pk, pv = m.prefixes(q, train=False)[0]  # G-prompt layer 0: length 6 -> 3 keys, 3 values
    assert pk.shape == (3, 3, 16) and pv.shape == (3, 3, 16)
    pk, pv = m.prefixes(q, train=False)[2]  # E-prompt layer 2: length 20 -> 10 + 10
    assert pk.shape == (3, 10, 16)


# ------------------------------------------------------------------------------------------- FT / FT++ / LwF
def test_ft_pp_masks_past_logits_and_ft_does_not():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    masked = mask_past_logits(logits, 2)
    assert torch.isinf(masked[0, :2]).all() and masked[0, 2:].tolist() == [3.0, 4.0]
    F.cross_entropy(masked, torch.tensor([3])).backward()
    assert logits.grad[0, :2].tolist() == [0.0, 0.0] and logits.grad[0, 2:].abs().sum() > 0
    t1, t2 = tasks()
    for name, past_zero in (("ft_pp", True), ("ft", False)):
        m = make(name)
        m.begin_task(t2)
        m.loss(batch(t2))["loss"].backward()
        gw = m.head.weight.grad
        assert (gw[:2].abs().sum() == 0) == past_zero, name
        assert gw[2:].abs().sum() > 0
        assert m.backbone.vit.blocks[0].attn.qkv.weight.grad is not None  # the whole ViT trains


def test_lwf_distillation_value():
    from continual_bench.methods.cls.lwf import lwf_distillation

    student = torch.zeros(1, 2)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    # T = 2: teacher softmax([ln 3, 0]) = [3/4, 1/4]; student log-softmax = [ln 1/2, ln 1/2] -> loss = ln 2
    assert lwf_distillation(student, teacher, 2.0).item() == pytest.approx(math.log(2))
    m = make("lwf")
    t1, t2 = tasks()
    m.begin_task(t1)
    assert m.teacher is None and set(m.loss(batch(t1))) == {"ce", "loss"}
    m.begin_task(t2)
    b = batch(t2)
    out = m.loss(b)
    assert out["distill"].item() == pytest.approx(lwf_distillation(
        m.logits(b["x"])[:, :2], m.teacher["head"](m.teacher["backbone"](b["x"]))[:, :2], 2.0).item(), abs=1e-6)
    # right after the snapshot the student equals the teacher: distillation = entropy of the teacher
    p = F.softmax(m.logits(b["x"])[:, :2] / 2, dim=1)
    assert out["distill"].item() == pytest.approx(float(-(p * p.log()).sum(1).mean().detach()), abs=1e-5)


# ------------------------------------------------------------------------------------------- C-LoRA
def _weight(m, name):
    return base_weight(m.backbone.vit.get_submodule(name))


def test_c_lora_penalty_and_merged_past_products():
    t1, t2 = tasks()
    m = make("c_lora", rank=2)
    targets = m.targets
    assert len(targets) == 5 and all(t.endswith("attn.qkv") for t in targets)
    w_init = {n: _weight(m, n).detach().clone() for n in targets}
    # hand-made task-1 LoRA: A1[0,0] = 1, B1[0,0] = 2 -> product has a single entry 2 at (0, 0)
    state = {f"head.{k}": v for k, v in m.head.state_dict().items()}
    for n in targets:
        A1, B1 = torch.zeros(2, 16), torch.zeros(48, 2)
        A1[0, 0], B1[0, 0] = 1.0, 2.0
        state[f"lora.001.{n}.A"], state[f"lora.001.{n}.B"] = A1, B1
    m.load_state(state, [t1])
    m.begin_task(t2)
    for n in targets:
        d = _weight(m, n).detach() - w_init[n]  # W = W_init + A1 B1 (past product merged, frozen)
        assert d[0, 0].item() == pytest.approx(2.0) and d.abs().sum().item() == pytest.approx(2.0)
    # hand-made current LoRA: product rows 0 and 1 = [3, 1, 0, ...]
    with torch.no_grad():
        for a, b, _ in m.lora_pairs().values():
            a.zero_()
            b.zero_()
            a[0, 0], a[0, 1] = 3.0, 1.0
            b[0, 0], b[1, 0] = 1.0, 1.0
    # || |past| ⊙ current ||_F^2 per target = (2 * 3)^2 = 36 (only (0, 0) overlaps); 5 targets
    assert m.penalty().item() == pytest.approx(5 * 36.0)
    out = m.loss(batch(t2))
    assert out["loss"].item() == pytest.approx(out["ce"].item() + m.settings.lam * 180.0, rel=1e-6)
    out["loss"].backward()
    a, b, _ = m.lora_pairs()[targets[0]]
    assert a.grad is not None and not _weight(m, targets[0]).requires_grad
    # the LoRA is applied in the forward pass: output changes by B A x on the qkv input
    m.end_task(t2)
    assert set(k for k in m.state_dict() if k.startswith("lora.")) == {
        f"lora.{t:03d}.{n}.{x}" for t in (1, 2) for n in targets for x in "AB"}


def test_c_lora_no_penalty_on_first_task():
    m = make("c_lora", rank=2)
    t1, _ = tasks()
    m.begin_task(t1)
    out = m.loss(batch(t1))
    assert "penalty" not in out and m.penalty().item() == 0.0


def test_cosine_schedule_is_coda_prompts():
    assert cosine_factor(0, 50) == 1.0
    assert cosine_factor(49, 50) == pytest.approx(math.cos(99 * math.pi / 200))
    assert cosine_factor(0, 1) == 1.0


# ------------------------------------------------------------------------------------------- issue 15: CODA-P's exact forms
def test_l2p_pp_key_loss_forms_against_a_hand_computation():
    """per_sample (L2P eq. 5, the toy default) vs coda_p (CODA-P's ``(1 - cos_sim[:, k_idx]).sum()``, B x B x k)."""
    from continual_bench.methods.cls.l2p_pp import key_matching_loss

    cos = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.6]])
    idx = torch.tensor([[0, 1], [1, 2]])  # each row's top-2
    # per sample: (1 - .9) + (1 - .5) + (1 - .8) + (1 - .6) = 1.2
    assert key_matching_loss(cos, idx, "per_sample").item() == pytest.approx(1.2)
    # CODA-P: every row against every row's choice {0, 1, 1, 2}: row 0: .1 + .5 + .5 + .9 = 2.0; row 1: .8 + .2 + .2 + .4
    assert key_matching_loss(cos, idx, "coda_p").item() == pytest.approx(2.0 + 1.6)
    # the same as CODA-P's indexing written out (B x B x k block) and as the form before issue 15 (own top-k values)
    assert key_matching_loss(cos, idx, "coda_p").item() == pytest.approx(float((1 - cos[:, idx]).sum()))
    torch.testing.assert_close(key_matching_loss(cos, idx, "per_sample"), (1 - torch.topk(cos, 2, dim=1).values).sum())
    with pytest.raises(ValueError, match="key_loss"):
        key_matching_loss(cos, idx, "mean")


@pytest.mark.parametrize("form, expected", [("per_sample", 1.2), ("coda_p", 1.8 + 2.0)])
def test_l2p_pp_training_loss_uses_the_configured_form(form, expected):
    m = make("l2p_pp", pool=3, length=2, top_k=2, key_loss=form)
    with torch.no_grad():
        m.net["prompt"].k_0.copy_(torch.eye(3, 16))  # key j = e_j: cos(q, k_j) = q_j / |q|
    q = torch.zeros(2, 16)
    q[0, :3] = torch.tensor([3.0, 4.0, 0.0])  # cos = (.6, .8, 0): top-2 = keys 1, 0
    q[1, :3] = torch.tensor([0.0, 3.0, 4.0])  # cos = (0, .6, .8): top-2 = keys 2, 1
    m._aux = []
    m.prefixes(q, train=True)
    # per_sample: (.2 + .4) + (.2 + .4); coda_p: row 0 on keys {1, 0, 2, 1}: .2 + .4 + 1 + .2; row 1: .4 + 1 + .2 + .4
    assert m._aux[0].item() == pytest.approx(expected)


def test_l2p_pp_key_loss_defaults_and_errors():
    from continual_bench.utils import UserError

    assert make("l2p_pp").settings.key_loss == "per_sample"  # the toy default: results/toy_cls ran with it
    with pytest.raises(UserError, match=r"l2p_pp.key_loss: 'batch' is not valid; allowed: one of \['per_sample', "
                                        r"'coda_p'\]"):
        make("l2p_pp", key_loss="batch")


def test_dualprompt_test_time_selection_seen_vs_pool_by_hand():
    """After task 1 of 3: 'seen' scores key 0 only; 'pool' (CODA-P) also the untrained keys of tasks 2 and 3."""
    q = torch.zeros(2, 16)
    q[0, 0], q[1, 1] = 1.0, 1.0
    keys = torch.zeros(3, 16)
    keys[0, :2] = torch.tensor([0.6, 0.8])  # cos with q0 .6, with q1 .8
    keys[1, 0] = 1.0  # a future task's key: cos with q0 1, with q1 0
    keys[2, :2] = torch.tensor([0.0, -1.0])  # cos with q1 -1
    picks = {}
    for mode in ("seen", "pool"):
        m = make("dualprompt", n_classes=6, n_tasks=3, test_keys=mode)
        with torch.no_grad():
            for l in m.e_layers:
                getattr(m.net["prompt"], f"k_{l}").copy_(keys)
        m.task_id = 0  # after task 1
        picks[mode] = m.select(q, 2, train=False).tolist()
        m.task_id = 1  # after task 2: key 1 is now a learned task's
        picks[mode + "2"] = m.select(q, 2, train=False).tolist()
    assert picks["seen"] == [0, 0] and picks["pool"] == [1, 0]
    assert picks["seen2"] == picks["pool2"] == [1, 0]
    # the prefixes follow the selection
    m = make("dualprompt", n_classes=6, n_tasks=3, test_keys="pool")
    with torch.no_grad():
        m.net["prompt"].k_2.copy_(keys)
    pk, _ = m.prefixes(q, train=False)[2]
    torch.testing.assert_close(pk[0], m.net["prompt"].e_2[1, :10])


def test_dualprompt_test_keys_default_and_error():
    from continual_bench.utils import UserError

    assert make("dualprompt").settings.test_keys == "seen"  # the toy default: results/toy_cls ran with it
    with pytest.raises(UserError, match=r"dualprompt.test_keys: 'all' is not valid; allowed: one of \['seen', 'pool'\]"):
        make("dualprompt", test_keys="all")


def test_matching_selection_and_logits_stay_fp32_under_bf16_autocast():
    """The engine runs the backbone under bf16 autocast on GPU; CODA-P computes key matching, top-k selection,
    its attention weights and the logits in fp32. CPU autocast stands in for CUDA's here."""
    from continual_bench.methods.cls.coda_p import CodaPromptPool
    from continual_bench.methods.cls.prompting import cosine_matrix

    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(4, 16, generator=g), torch.randn(7, 16, generator=g)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with bf16():
        cos = cosine_matrix(q, keys)
        assert (q @ keys.T).dtype == torch.bfloat16  # autocast is on: a plain matmul drops to bf16
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, cosine_matrix(q, keys), rtol=0, atol=0)
    K, A, P = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    with bf16():
        prompt, alpha = CodaPromptPool.combine(q, K, A, P)
    assert alpha.dtype == prompt.dtype == torch.float32
    torch.testing.assert_close(alpha, CodaPromptPool.combine(q, K, A, P)[1], rtol=0, atol=0)

    x = torch.rand(3, 3, 16, 16, generator=g)
    t1, t2 = tasks()
    for name in ("l2p", "l2p_pp", "dualprompt", "coda_p", "ft", "lwf", "c_lora", "upper_bound", "ft_pp"):
        m = make(name, rank=2) if name == "c_lora" else make(name)
        m.begin_task(t1)
        m.eval()
        with bf16():
            logits = m.logits(x)
        assert logits.dtype == torch.float32, name
        if name == "dualprompt":
            with bf16():
                sel = m.select(q, 2, train=False)
            assert torch.equal(sel, m.select(q, 2, train=False))
    m = make("l2p_pp")
    m.train()
    with bf16():
        m.loss(batch(t1))
    assert m._aux[0].dtype == torch.float32  # the matching loss
    m = make("c_lora", rank=2)
    m.begin_task(t1)
    m.end_task(t1)
    m2 = make("c_lora", rank=2)
    m2.load_state(m.state_dict(), [t1])
    m2.begin_task(t2)
    with torch.no_grad():
        for a, b, _ in m2.lora_pairs().values():
            b.normal_()
    with bf16():
        assert m2.penalty().dtype == torch.float32
        assert m2.loss(batch(t2))["penalty"].dtype == torch.float32


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_engine_autocast_follows_precision():
    from continual_bench.engine.runner import amp_context

    assert amp_context("cpu", "bf16")() is not None and not isinstance(amp_context("cpu", "bf16")(), torch.autocast)
    assert isinstance(amp_context("cuda", "bf16")(), torch.autocast)
    assert not isinstance(amp_context("cuda", "fp32")(), torch.autocast)


def test_c_lora_kv_targets_leave_the_query_rows_unadapted():
    """targets='kv': the fused qkv layer's LoRA updates only the K and V outputs (rows D..3D), exactly."""
    from continual_bench.utils import UserError

    t1, _ = tasks()
    D = 16
    for targets, q_moves in (("kv", False), ("qkv", True)):
        m = make("c_lora", rank=2, targets=targets)
        assert len(m.targets) == 5 and all(t.endswith("attn.qkv") for t in m.targets)
        m.begin_task(t1)
        opt = torch.optim.Adam([p for g in m.param_groups() for p in g["params"]], lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            m.loss(batch(t1))["loss"].backward()
            opt.step()
        for n in m.targets:
            d = live_delta(m.backbone.vit.get_submodule(n)).detach()
            assert d.shape == (3 * D, D)
            assert (d[:D].abs().sum() > 0) == q_moves, (targets, n)
            assert d[D:].abs().sum() > 0
    assert make("c_lora").settings.targets == "qkv"  # toy default: today's behaviour
    m = make("c_lora", rank=2, targets="kv,proj")
    assert len(m.targets) == 10
    with pytest.raises(UserError, match=r"c_lora.targets: 'q' is not valid; allowed: one of \['qkv', 'kv', 'qkv,proj', "
                                        r"'kv,proj'\]"):
        make("c_lora", targets="q")
