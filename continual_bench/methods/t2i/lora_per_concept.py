"""One LoRA per concept, selected at generation by the prompt's concept token (no forgetting by construction).

Paper: the per-concept adapters are the LoRA of Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022, in the cross-attention K/V placement of C-LoRA (Smith et al., "Continual Diffusion",
TMLR 2024, arXiv 2304.06027, sec. 3.1); keeping one adapter per concept is the storage-for-forgetting
reference point that C-LoRA's single growing model is compared against.

Equation: task k trains a fresh pair (A_k, B_k) on the frozen backbone, never on top of earlier pairs,

    W^(k) = W_init + A_k B_k          for every W in {W_K, W_V} of the UNet's cross-attention,
    L_k = L_diffusion(images of concept k, "a photo of <vk>"),

and the pairs are stored, not folded. At generation the prompt chooses the weights:

    W(prompt) = W_init + sum_{k : <vk> in prompt} A_k B_k,

i.e. concept k's prompt uses LoRA k and a prompt without concept tokens (the generic "a photo of a
person") uses the base weights. (With several concept tokens in one prompt their updates are summed:
the naive merge; the benchmark's prompts hold one token.) Earlier concepts cannot be forgotten, and the
generic prompt cannot drift; the price is N_store = T x (one LoRA + one token row), growing with the
number of tasks, and a router (here: the token itself) at inference.

Same adapter, rank, learning rates and token handling as ``lora_sequential`` (it subclasses it), so the
two differ only in fold-vs-store.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..base import Task
from ..registry import register
from .lora_sequential import CROSS_ATTN_KV, LoRASequential, LoRASettings, lora_delta


@dataclass
class LoRAPerConceptSettings(LoRASettings):
    """The same as ``lora_sequential`` (toy: rank 4, lr 5e-3, token lr 2e-2; paper profile: rank 16, lr 5e-4)."""


def _base_weight(module) -> torch.Tensor:
    """The frozen weight of a (possibly peft-wrapped) linear layer."""
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


@register("t2i", "lora_per_concept")
class LoRAPerConcept(LoRASequential):
    """One stored LoRA per concept (Hu et al. ICLR 2022 in C-LoRA's K/V placement, Smith et al. TMLR 2024).

    W(prompt) = W_init + sum over the prompt's concept tokens k of A_k B_k; the generic prompt uses W_init.
    """

    paper = ("Hu et al., LoRA, ICLR 2022; one adapter per concept on cross-attention K/V as in Smith et al., "
             "Continual Diffusion (C-LoRA), TMLR 2024, arXiv:2304.06027")
    Settings = LoRAPerConceptSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        # W_init of every cross-attention K/V projection, restored after each selection
        self._w_init = {n: _base_weight(m).detach().clone() for n, m in model.unet.named_modules()
                        if n.endswith(tuple(CROSS_ATTN_KV))
                        and (hasattr(m, "base_layer") or isinstance(m, torch.nn.Linear))}

    # ------------------------------------------------------------------ state: store, never fold
    def _fold(self, entry: dict[str, torch.Tensor]) -> None:
        """Loaded LoRAs stay separate (selected per prompt), unlike ``lora_sequential``'s fold."""

    def end_task(self, task: Task) -> None:
        super().end_task(task)  # stores (A_k, B_k, scaling, token) in self.past
        self.model.unet.disable_adapters()  # the live adapter is now LoRA k among the stored ones: select per prompt

    # ------------------------------------------------------------------ selection
    def concepts_in(self, prompt: str) -> list[int]:
        """1-based indices of the stored concepts whose token occurs in ``prompt``."""
        tokens = self.model.concept_tokens
        return [i for i in range(1, len(self.past) + 1) if i <= len(tokens) and tokens[i - 1] in prompt]

    @contextlib.contextmanager
    def weights_for(self, prompt: str):
        """Within the block the K/V weights are W_init + sum of the LoRAs of the prompt's concepts."""
        chosen = self.concepts_in(prompt)
        unet = self.model.unet
        try:
            with torch.no_grad():
                for name, w0 in self._w_init.items():
                    w = w0.clone()
                    for k in chosen:
                        e = self.past[k - 1]
                        w += lora_delta(e[f"{name}.A"], e[f"{name}.B"], e[f"{name}.scaling"].item()).to(w)
                    _base_weight(unet.get_submodule(name)).copy_(w)
            yield chosen
        finally:
            with torch.no_grad():
                for name, w0 in self._w_init.items():
                    _base_weight(unet.get_submodule(name)).copy_(w0)

    def generate_prompt(self, prompt: str, n: int, *, seed: int, **sample_kw) -> np.ndarray:
        with self.weights_for(prompt):
            return super().generate_prompt(prompt, n, seed=seed, **sample_kw)
