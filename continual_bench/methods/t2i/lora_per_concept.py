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
two differ only in fold-vs-store. Each concept's LoRA is a named peft adapter (``concept<k>``); generation merges
the prompt's ones into the base weights with peft's merge and restores the base weights exactly afterwards
(:func:`continual_bench.methods.lora.merged`), so the forward pass is the one of a plain layer with
``W_init + sum A_k B_k``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import lora
from ..base import Task
from ..registry import register
from .lora_sequential import LoRASequential, LoRASettings, lora_config


@dataclass
class LoRAPerConceptSettings(LoRASettings):
    """The same as ``lora_sequential`` (toy: rank 4, lr 5e-3, token lr 2e-2; paper profile: rank 16, lr 5e-4)."""


@register("t2i", "lora_per_concept")
class LoRAPerConcept(LoRASequential):
    """One stored LoRA per concept (Hu et al. ICLR 2022 in C-LoRA's K/V placement, Smith et al. TMLR 2024).

    W(prompt) = W_init + sum over the prompt's concept tokens k of A_k B_k; the generic prompt uses W_init.
    """

    paper = ("Hu et al., LoRA, ICLR 2022; one adapter per concept on cross-attention K/V as in Smith et al., "
             "Continual Diffusion (C-LoRA), TMLR 2024, arXiv:2304.06027")
    Settings = LoRAPerConceptSettings

    @staticmethod
    def adapter_of(k: int) -> str:
        """The peft adapter holding concept ``k``'s LoRA."""
        return f"concept{k}"

    # ------------------------------------------------------------------ state: store, never fold
    def _fold(self, entry: dict[str, torch.Tensor]) -> None:
        """A loaded LoRA stays separate, as its concept's named adapter (disabled until a prompt selects it),
        unlike ``lora_sequential``'s fold."""
        name = self.adapter_of(len(self.past) + 1)
        lora.add_adapter(self.model.unet, lora_config(self.settings.rank, self.settings.alpha), name)
        lora.set_factors(self.model.unet, name, lora.factors_of(entry))
        lora.enable_adapters(self.model.unet, False)

    def begin_task(self, task: Task) -> None:
        self.adapter = self.adapter_of(task.index)
        super().begin_task(task)

    def end_task(self, task: Task) -> None:
        super().end_task(task)  # stores (A_k, B_k, scaling, token) in self.past
        lora.enable_adapters(self.model.unet, False)  # adapter k is now one of the stored ones: selected per prompt

    # ------------------------------------------------------------------ selection
    def concepts_in(self, prompt: str) -> list[int]:
        """1-based indices of the stored concepts whose token occurs in ``prompt``."""
        tokens = self.model.concept_tokens
        return [i for i in range(1, len(self.past) + 1) if i <= len(tokens) and tokens[i - 1] in prompt]

    @contextlib.contextmanager
    def weights_for(self, prompt: str):
        """Within the block the K/V weights are W_init + sum of the LoRAs of the prompt's concepts."""
        chosen = self.concepts_in(prompt)
        with lora.merged(self.model.unet, [self.adapter_of(k) for k in chosen]):
            yield chosen

    def generate_prompt(self, prompt: str, n: int, *, seed: int, **sample_kw) -> np.ndarray:
        with self.weights_for(prompt):
            return super().generate_prompt(prompt, n, seed=seed, **sample_kw)
