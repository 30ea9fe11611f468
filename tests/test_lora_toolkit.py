"""The LoRA toolkit (continual_bench.methods.lora): C-LoRA's penalty equation, products summed (not factors),
stored factors, folding with peft's merge arithmetic, per-concept merging that restores the weights exactly."""
import pytest
import torch
from peft import LoraConfig
from torch import nn

from continual_bench.methods import lora
from continual_bench.methods.t2i.c_lora import past_products


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def _cfg(r=2, alpha=1.0):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=["0", "2"], init_lora_weights="gaussian")


def _randomize(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b, _ in lora.lora_pairs(model, adapter).values():
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(torch.randn(b.shape, generator=g))


# ------------------------------------------------------------------------------------------- C-LoRA's equation
def test_c_lora_penalty_by_hand():
    past = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    cur = torch.tensor([[2.0, 1.0], [5.0, -1.0]])
    # |past| ⊙ cur = [[2, 2], [0, -3]] -> 4 + 4 + 0 + 9
    assert lora.c_lora_penalty(past, cur).item() == 17.0


def test_c_lora_sums_products_not_factors():
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])  # B1 A1 = [[1, 0], [0, 0]]
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])  # B2 A2 = [[0, 0], [0, 1]]
    past = [{"m.A": a1, "m.B": b1, "m.scaling": torch.tensor(2.0)},
            {"m.A": a2, "m.B": b2, "m.scaling": torch.tensor(2.0)}]
    assert torch.equal(past_products(past)["m"], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(lora.sum_products([lora.factors_of(e) for e in past])["m"], past_products(past)["m"])
    # (B1 + B2)(A1 + A2) * 2 would be all twos: the known bug
    assert not torch.equal(past_products(past)["m"], lora.lora_delta(a1 + a2, b1 + b2, 2.0))


def test_regularizer_sums_the_live_products_against_the_past():
    net = _net()
    lora.add_adapter(net, _cfg())
    _randomize(net, "default", 1)
    past = {"0": torch.randn(5, 6), "2": torch.zeros(4, 5)}  # layer 2: a zero past adds nothing
    by_hand = lora.c_lora_penalty(past["0"], lora.lora_delta(*lora.lora_pairs(net)["0"]))
    for fp32 in (True, False):
        total = lora.c_lora_regularizer(net, past, device="cpu", fp32=fp32)
        assert torch.equal(total, torch.zeros(()) + by_hand)
    assert lora.c_lora_regularizer(net, {}, device="cpu").item() == 0.0
    total.backward()  # differentiable through peft's get_delta_weight
    a, b, _ = lora.lora_pairs(net)["0"]
    assert a.grad is not None and b.grad is not None


# ------------------------------------------------------------------------------------------- factors, folding
def test_live_delta_is_the_product_and_factors_round_trip():
    net = _net()
    lora.add_adapter(net, _cfg(r=3, alpha=2.0))
    _randomize(net, "default", 2)
    pairs = lora.lora_pairs(net)
    assert list(pairs) == ["0", "2"] and all(s == 2.0 / 3 for _, _, s in pairs.values())
    for name, layer in lora.lora_layers(net).items():
        assert torch.equal(lora.live_delta(layer), lora.lora_delta(*pairs[name]))  # peft's arithmetic, bit for bit
    state = lora.factors_to_state(pairs, prefix="task1.")
    assert sorted(state) == [f"task1.{n}.{x}" for n in ("0", "2") for x in ("A", "B", "scaling")]
    back = lora.factors_of(state, prefix="task1.")
    assert all(torch.equal(back[n][0], pairs[n][0]) and torch.equal(back[n][1], pairs[n][1]) for n in pairs)
    assert back["0"][2] == pytest.approx(2.0 / 3)
    no_scaling = lora.factors_of(lora.factors_to_state(pairs, with_scaling=False), scaling=0.5)
    assert no_scaling["2"][2] == 0.5
    assert lora.lora_parameters(net) == [p for a, b, _ in pairs.values() for p in (a, b)]


def test_fold_adds_the_product_as_peft_merge_would():
    net, ref = _net(), _net()
    for m in (net, ref):
        lora.add_adapter(m, _cfg())
        _randomize(m, "default", 3)
    factors = {n: (a.detach().clone(), b.detach().clone(), s) for n, (a, b, s) in lora.lora_pairs(ref).items()}
    w0 = lora.base_weight(net[0]).detach().clone()
    deltas = lora.fold(net, factors)
    for layer in lora.lora_layers(ref).values():
        layer.merge(adapter_names=["default"])
    for n in ("0", "2"):
        assert torch.equal(lora.base_weight(net.get_submodule(n)), lora.base_weight(ref.get_submodule(n)))
    assert torch.equal(lora.base_weight(net[0]), w0 + deltas["0"])
    assert lora.base_layer(net[0]) is net[0].get_base_layer() and lora.base_layer(net[1]) is net[1]


def test_merged_selects_named_adapters_and_restores_the_weights_exactly():
    net = _net()
    for k in (1, 2):
        lora.add_adapter(net, _cfg(), f"concept{k}")
        _randomize(net, f"concept{k}", 10 + k)
    lora.enable_adapters(net, False)
    x = torch.randn(3, 6)
    w0 = {n: lora.base_weight(net.get_submodule(n)).detach().clone() for n in ("0", "2")}
    base = net(x)
    with lora.merged(net, []):
        assert torch.equal(net(x), base)
    for chosen in (["concept1"], ["concept1", "concept2"]):
        with lora.merged(net, chosen):
            for n, w in w0.items():
                layer = net.get_submodule(n)
                expected = w.clone()
                for name in chosen:
                    expected += lora.live_delta(layer, name).detach()
                assert torch.equal(lora.base_weight(layer), expected)
            plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
            with torch.no_grad():
                for i in (0, 2):
                    plain[i].weight.copy_(lora.base_weight(net[i]))
                    plain[i].bias.copy_(lora.base_layer(net[i]).bias)
            assert torch.equal(net(x), plain(x))  # the merged forward is a plain layer's
        for n, w in w0.items():
            assert torch.equal(lora.base_weight(net.get_submodule(n)), w)  # exactly, not W + d - d
        assert torch.equal(net(x), base)
