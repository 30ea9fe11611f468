"""C-LoRA: continually self-regularized LoRA on the UNet's cross-attention key/value projections.

Paper: Smith, Hsu, Zhang, Hua, Kira, Shen, Jin, "Continual Diffusion: Continual Customization of
Text-to-Image Diffusion with C-LoRA", TMLR 2024 (arXiv 2304.06027): its weight decomposition and
self-regularization, written from the paper's description (equation numbers not re-checked).

Equation: for every cross-attention projection W in {W_K, W_V} (``attn2.to_k``, ``attn2.to_v``), task t
trains a new low-rank pair on top of the frozen sum of the past ones (as ``lora_sequential``),

    W_t = W_init + sum_{t'<t} A_t' B_t' + A_t B_t,
    L   = L_diffusion + lambda * sum_W || |sum_{t'<t} A_t' B_t'| ⊙ (A_t B_t) ||_F^2

|.| element-wise absolute value, ⊙ element-wise product. Every "A B" is a whole *product* as peft applies
it, ``scaling * lora_B @ lora_A`` (shape of W): the past products are summed first and the absolute value
taken of the sum (summing the A's and the B's separately and multiplying is a known third-party bug).
Task 1 has no past, so no penalty. The penalty discourages writing where earlier tasks already wrote.
Customized tokens follow the paper: a new, randomly initialised embedding per concept, trained with the
LoRA, and the prompt "a photo of <vK>" has no class word (all of this inherited from ``lora_sequential``).

lambda: the paper uses 1e8 on Stable Diffusion. The penalty is fourth order in the weight updates, so
its scale depends on the model's weight scale and the LoRA rank; the toy default 10 was chosen on a
grid {0, 1, 10, 30, 50, 100, 1000} for the toy backbone (``config/toy_full.yaml`` documents the grid and the rule:
the lowest forgetting among values whose plasticity is at least 0.8 x sequential LoRA's).
The raw penalty is logged as ``penalty`` in the loss dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lora
from ..base import Task, setting
from ..registry import register
from .lora_sequential import LoRASequential, LoRASettings


@dataclass
class CLoRASettings(LoRASettings):
    lam: float = setting(10.0, "lambda of the self-regularization (toy backbone: chosen on a grid, config/toy_full.yaml; "
                         "paper profile: 1e8, C-LoRA paper)", min=0)


def past_products(past: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Module name -> sum over finished tasks of their products ``scaling * B @ A`` (not of the factors)."""
    return lora.sum_products(lora.factors_of(entry) for entry in past)


@register("t2i", "c_lora")
class CLoRA(LoRASequential):
    """C-LoRA (Smith et al., TMLR 2024, arXiv 2304.06027): self-regularized LoRA.

    W_t = W_init + sum_{t'<t} A_t' B_t' + A_t B_t on cross-attention K/V, and
    L = L_diffusion + lambda * sum_W || |sum_{t'<t} A_t' B_t'| ⊙ (A_t B_t) ||_F^2.
    """

    paper = "Smith et al., Continual Diffusion (C-LoRA), TMLR 2024, arXiv:2304.06027"
    Settings = CLoRASettings

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        device = self.model.unet.device
        self.past_sum = {n: d.to(device).detach() for n, d in past_products(self.past).items()}

    def penalty(self) -> torch.Tensor:
        """sum over the adapted projections of || |sum_{t'<t} A_t' B_t'| ⊙ (A_t B_t) ||_F^2 (the toolkit's, under the
        engine's autocast as this track's results were computed; the classification track's runs in fp32)."""
        return lora.c_lora_regularizer(self.model.unet, self.past_sum, device=self.model.unet.device,
                                       adapter=self.adapter, fp32=False)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().loss(batch)
        if self.past_sum and self.settings.lam > 0:
            out["penalty"] = self.penalty()
            out["loss"] = out["loss"] + self.settings.lam * out["penalty"]
        return out
