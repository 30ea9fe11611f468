"""Magnitude-based merging (MagMax-style): after each task keep, per weight entry, the larger-magnitude update.

Paper: Staniszewski, Zaleska, Deja, "Low-Rank Continual Personalization of Diffusion Models" (arXiv 2410.04891),
the merging "through a selection of weights with the highest magnitude for the task" (after MagMax, Marczak et
al., ECCV 2024). Code read for this file: github.com/luk-st/continual-lora (commit eb586cd),
``lora/train_dreambooth_lora_sdxl.py`` (experiment ``mag_max_light``) and ``merging/task_vectors.py``
(``TaskVector``, ``merge_max_abs``).

Equation: task t trains a fresh pair (A_t, B_t) on W_{t-1} = W_0 + tau_{t-1} (as ``lora_merge_consecutive``);
with d_t = s B_t A_t, element-wise for every adapted weight entry,

    tau_t = d_t                      where |d_t| >= |tau_{t-1}|   (ties go to the new task),
          = tau_{t-1}                elsewhere,                      W_t = W_0 + tau_t,   tau_0 = 0.

Their code: ``previous_tasks_vector = W_{t-1} - W_0``, ``last_task_vector = (W_{t-1} + fused LoRA) - W_0 -
previous`` (= d_t up to rounding), ``merge_max_abs([previous, last])`` with ``torch.where(|last| >= |prev|, last,
prev)``, then ``W_0 + merged`` saved as the model task t+1 starts from. State: tau (dense, per adapted
projection) and the concept rows (``lora_merge_consecutive`` says why and how resume is exact).

Where this differs from the authors' code: d_t is the LoRA product itself, not a difference of two fp16/bf16
pipelines' weights (their rounding is not reproduced); their task vectors cover the whole UNet state dict, of
which only the adapted projections change (the rest stays W_0 either way). Placement, token and prompt as in
``lora_merge_consecutive``.
"""
from __future__ import annotations

import torch

from .. import lora
from ..registry import register
from .lora_merge_consecutive import LoRAMerge


def magnitude_merge(tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """Element-wise: the new task's update where |d_t| >= |tau_{t-1}|, else the old value (MagMax's max-abs)."""
    if tau is None:
        return delta.clone()
    return torch.where(delta.abs() >= tau.abs(), delta, tau)


@register("t2i", "lora_merge_magnitude")
class LoRAMergeMagnitude(LoRAMerge):
    """Magnitude-based merging (Staniszewski et al., arXiv 2410.04891; code ``mag_max_light``).

    tau_t = where(|s B_t A_t| >= |tau_{t-1}|, s B_t A_t, tau_{t-1}) element-wise; W_t = W_0 + tau_t.
    """

    paper = ("Staniszewski et al., Low-Rank Continual Personalization of Diffusion Models, arXiv:2410.04891 - "
             "magnitude-based merging (MagMax)")

    def absorb(self, pairs: lora.Factors) -> None:
        for n, (a, b, s) in pairs.items():
            self.tau[n] = magnitude_merge(self.tau.get(n), lora.lora_delta(a, b, s))
