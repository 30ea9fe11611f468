"""The LoRA toolkit both tracks use: adapters through peft's public API, LoRA products, folding, stored factors,
per-concept switching and C-LoRA's self-regularization. The only module that reads peft's per-adapter
attributes (``lora_A[...]``, ``lora_B[...]``, ``scaling[...]``); methods ask this one.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): a frozen linear layer W gets
a trainable pair, ``W x + scaling * B (A x)``, A (r x in), B (out x r), ``scaling = alpha / r``. Its *product* (the
weight update, shape of W) is ``scaling * B @ A`` (:func:`lora_delta`), computed as peft's ``get_delta_weight``
computes it: ``(B @ A) * scaling``. Both tracks' continual LoRA methods store every finished task's factors in the
same layout, ``<prefix><module>.A`` and ``<prefix><module>.B`` (and ``<prefix><module>.scaling``, a 0-d tensor, where
the method's state carries it; :func:`factors_to_state` / :func:`factors_of`), and either *fold* them into the base
weights (:func:`fold`: ``W += scaling * B @ A``, the arithmetic of peft's merge) or keep one named adapter per
concept and merge the prompt's ones for generation (:func:`merged`).

Why folding is not peft's ``merge``: a merged peft adapter stays in the layer, the layer then counts as merged (its
forward skips every unmerged adapter, so the next task's fresh adapter would never train) and peft refuses to
delete a merged adapter. A continual method folds finished tasks for good and trains a fresh adapter on top, so the
fold writes the product into the base weight itself, exactly as peft's merge would.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A, B, scaling)


# ------------------------------------------------------------------------------------------- layers and adapters
def _tuner_layer_cls():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def base_layer(module: nn.Module) -> nn.Module:
    """The frozen layer under a peft LoRA wrapper (peft's ``get_base_layer``); a plain layer is its own."""
    return module.get_base_layer() if isinstance(module, _tuner_layer_cls()) else module


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight of a (possibly peft-wrapped) linear layer."""
    return base_layer(module).weight


def add_adapter(model: nn.Module, config, name: str = "default") -> None:
    """Add a named LoRA adapter to every layer ``config`` targets, make it the active one and enable adapters.

    Models with peft's integration (diffusers' UNet: ``add_adapter``) use it; others (timm's ViT) get peft's
    ``inject_adapter_in_model``. Adapters are enabled afterwards: a model whose adapters were disabled
    (:func:`enable_adapters`) would otherwise train its new adapter without ever using it. Initialisation draws from
    the global RNG (seed it first)."""
    if hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=name)
    enable_adapters(model, True)


def lora_layers(model: nn.Module, adapter: str | None = "default") -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer holding ``adapter`` (None: every LoRA layer), in ``named_modules`` order."""
    layer_cls = _tuner_layer_cls()
    return {n: m for n, m in model.named_modules()
            if isinstance(m, layer_cls) and (adapter is None or adapter in m.lora_A)}


def lora_pairs(model: nn.Module, adapter: str = "default") -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
    """Module name -> (lora_A weight (r x in), lora_B weight (out x r), scaling) of ``adapter``: the live, trainable
    factors (peft offers no public accessor for them)."""
    return {n: (m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.scaling[adapter])
            for n, m in lora_layers(model, adapter).items()}


def lora_parameters(model: nn.Module, adapter: str = "default") -> list[nn.Parameter]:
    """``adapter``'s trainable weights, A then B per layer, in ``named_modules`` order."""
    return [p for a, b, _ in lora_pairs(model, adapter).values() for p in (a, b)]


def live_delta(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """The product of a live adapter as a weight update, differentiable: peft's ``get_delta_weight``."""
    return layer.get_delta_weight(adapter)


def set_factors(model: nn.Module, adapter: str, factors: Factors) -> None:
    """Copy stored factors into the adapter's weights (the adapter's own scaling applies)."""
    with torch.no_grad():
        for name, layer in lora_layers(model, adapter).items():
            a, b, _ = factors[name]
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)


def enable_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer's adapters on or off (peft's ``enable_adapters``; off = the base weights alone)."""
    for layer in lora_layers(model, None).values():
        layer.enable_adapters(enabled)


@contextlib.contextmanager
def merged(model: nn.Module, adapters: list[str]) -> Iterator[None]:
    """Within the block every LoRA layer's base weight is ``W + sum of the named adapters' products`` (peft's
    ``merge``, in the order given; a merged layer's forward is its base layer alone), or ``W`` with adapters
    disabled when none is named. On leaving: peft's ``unmerge``, then the weights exactly as before (unmerge
    subtracts the products again, and ``W + d - d`` is not always ``W`` to the last bit) and adapters disabled."""
    layers = lora_layers(model, None)
    before = {n: base_weight(m).detach().clone() for n, m in layers.items()}
    try:
        if adapters:
            with torch.no_grad():
                for layer in layers.values():
                    layer.merge(adapter_names=list(adapters))
        enable_adapters(model, bool(adapters))  # disabled, a merged layer's forward would unmerge it first
        yield
    finally:
        with torch.no_grad():
            for n, layer in layers.items():
                if layer.merged:
                    layer.unmerge()
                base_weight(layer).copy_(before[n])
        enable_adapters(model, False)


# ------------------------------------------------------------------------------------------- products and folding
def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update of one LoRA pair, ``scaling * B @ A`` (shape of the frozen weight), computed as peft's
    ``get_delta_weight``: ``(B @ A) * scaling``."""
    return (b @ a) * scaling


def fold(model: nn.Module, factors: Factors) -> dict[str, torch.Tensor]:
    """Add every stored pair's product into its module's base weight, for good (``W += scaling * B @ A``, peft's
    merge arithmetic; the module docstring says why not peft's merge). Returns module -> the product added."""
    deltas = {}
    with torch.no_grad():
        for name, (a, b, scaling) in factors.items():
            w = base_weight(model.get_submodule(name))
            deltas[name] = lora_delta(a.to(w), b.to(w), scaling)
            w += deltas[name]
    return deltas


def sum_products(tasks: Iterable[Factors]) -> dict[str, torch.Tensor]:
    """Module name -> sum over finished tasks of their products ``scaling * B @ A`` (not of the factors)."""
    out: dict[str, torch.Tensor] = {}
    for factors in tasks:
        for module, (a, b, scaling) in factors.items():
            d = lora_delta(a, b, scaling)
            out[module] = out[module] + d if module in out else d.clone()
    return out


# ------------------------------------------------------------------------------------------- stored factors
def factors_to_state(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]], prefix: str = "",
                     with_scaling: bool = True) -> dict[str, torch.Tensor]:
    """Detached copies of live factors as state entries ``<prefix><module>.A`` / ``.B`` (/ ``.scaling``, 0-d)."""
    state = {}
    for name, (a, b, scaling) in pairs.items():
        state[f"{prefix}{name}.A"] = a.detach().clone()
        state[f"{prefix}{name}.B"] = b.detach().clone()
        if with_scaling:
            state[f"{prefix}{name}.scaling"] = torch.tensor(float(scaling))
    return state


def factors_of(state: dict[str, torch.Tensor], prefix: str = "", scaling: float | None = None) -> Factors:
    """Module -> (A, B, scaling) from state entries ``<prefix><module>.A`` / ``.B``; the scaling is the stored
    ``.scaling`` entry, or ``scaling`` for states that do not carry it."""
    out = {}
    for key in [k for k in state if k.startswith(prefix) and k.endswith(".A")]:
        module = key[len(prefix): -len(".A")]
        s = state[f"{prefix}{module}.scaling"].item() if scaling is None else scaling
        out[module] = (state[key], state[f"{prefix}{module}.B"], s)
    return out


# ------------------------------------------------------------------------------------------- C-LoRA
def c_lora_penalty(past_sum: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|| |past_sum| ⊙ delta ||_F^2 for one projection (past_sum = sum of past products, delta = A_t B_t)."""
    return ((past_sum.abs() * delta) ** 2).sum()


def c_lora_regularizer(model: nn.Module, past: dict[str, torch.Tensor], *, device, adapter: str = "default",
                       fp32: bool = True) -> torch.Tensor:
    """C-LoRA's self-regularization (Smith et al., "Continual Diffusion: Continual Customization of Text-to-Image
    Diffusion with C-LoRA", TMLR 2024, arXiv 2304.06027, sec. 3)::

        sum over adapted projections W of || |sum_{t'<t} A_t' B_t'| ⊙ (A_t B_t) ||_F^2

    ``past``: module -> the sum of the finished tasks' *products* (:func:`sum_products`; summing the A's and the B's
    separately and multiplying is a known third-party bug); A_t B_t is ``adapter``'s live product (peft's
    ``get_delta_weight``). A projection without a past sum, or whose past sum is zero everywhere, adds nothing.
    ``fp32``: computed in fp32 with autocast off, whatever the engine's precision (the classification track); else
    under the caller's autocast (the text-to-image track, as its results were computed)."""
    total = torch.zeros((), device=device)
    region = torch.autocast(device_type=total.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    with region:
        for name, layer in lora_layers(model, adapter).items():
            p = past.get(name)
            if p is None or not bool(p.any()):
                continue
            d = live_delta(layer, adapter)
            total = total + (c_lora_penalty(p.float(), d.float()) if fp32 else c_lora_penalty(p, d))
    return total
