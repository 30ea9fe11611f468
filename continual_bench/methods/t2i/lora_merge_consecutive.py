"""Merge & initialization: a fresh LoRA per task, trained on the current model and folded into it afterwards.

Paper: Staniszewski, Zaleska, Deja, "Low-Rank Continual Personalization of Diffusion Models" (arXiv 2410.04891,
ICLR 2025 SCOPE workshop), the "consecutive merging" (merge & initialization) baseline, in the regime where only
the model (or the model and one adapter) passes from one task to the next. Code read for this file:
github.com/luk-st/continual-lora (commit eb586cd), ``lora/train_dreambooth_lora_sdxl.py`` (experiment
``merge_and_init``) and ``scripts_train/train_lora_args.sh``.

Equation: with tau_0 = 0, task t trains a fresh pair (A_t, B_t) on W_{t-1} = W_0 + tau_{t-1} and then

    tau_t = tau_{t-1} + s B_t A_t,       W_t = W_0 + tau_t,          s = alpha / rank,

for every adapted projection (their script: the model saved after task t is the one task t+1 starts from,
``pipeline.fuse_lora`` then ``save_pretrained``). What passes between tasks is the model: the state stores
tau_t per adapted projection (``merged.<module>.delta``, dense) and the concept tokens' rows, so N_store does not
grow with the number of tasks beyond one row per concept. The weights after a task are always rebuilt as
``W_0 + tau`` (live and resumed alike), so a resumed run is bit-identical.

Where this differs from the authors' code (facts from the files above):
- Their adapters sit on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention of SDXL's UNet (self- and
  cross-attention; rank 64, alpha = rank, lr 1e-5, 850 steps, batch 1, DreamBooth prompts "a photo of <rare
  token> <class>", no text-encoder training). Here: ``targets='attn'`` (default) adapts the same four
  projections of every attention block; the concept token is a new, randomly initialised embedding row trained
  with the LoRA and the prompt has no class word (C-LoRA's protocol, as every LoRA method of this suite).
- With ``targets='cross_kv'`` this method is exactly ``lora_sequential`` (same fold, C-LoRA's placement) except
  for what is stored (tau here, per-task factors there).
- Their fold goes through fp16/bf16 pipelines; here the product is added in the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lora
from ..base import T2IMethod, Task, setting
from ..registry import register
from .lora_sequential import CROSS_ATTN_KV, LoRASequential, LoRASettings

#: adapted projections: ``attn`` = the authors' code (to_q/to_k/to_v/to_out.0 of every attention); ``cross_kv`` =
#: C-LoRA's cross-attention key/value (peft matches these as module-name suffixes)
TARGETS = {"attn": ["to_q", "to_k", "to_v", "to_out.0"], "cross_kv": CROSS_ATTN_KV}


@dataclass
class LoRAMergeSettings(LoRASettings):
    """lora_sequential's settings (toy: rank 4, lr 5e-3, token lr 2e-2; the authors' code: rank 64, alpha = rank,
    lr 1e-5, 850 steps, batch 1, SDXL) and where the adapters sit."""

    targets: str = setting("attn", "adapted projections: 'attn' = to_q/k/v/out of every attention (the authors' "
                           "code), 'cross_kv' = cross-attention K/V (C-LoRA)", choices=tuple(TARGETS))


def merge_config(rank: int, alpha: float, targets: str):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGETS[targets])


def consecutive_merge(tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """tau_t = tau_{t-1} + s B_t A_t (``delta`` = the finished task's product; ``tau`` None before task 1)."""
    return delta.clone() if tau is None else tau + delta


class LoRAMerge(LoRASequential):
    """Shared machinery of the three merging baselines: only ``W_0 + tau`` (and the concept rows) passes on.

    A subclass sets :meth:`absorb` (how a finished task's factors change tau)."""

    Settings = LoRAMergeSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        self.w0: dict[str, torch.Tensor] = {}  # module -> W_0, snapshot before the first change
        self.tau: dict[str, torch.Tensor] = {}  # module -> W_t - W_0

    # ------------------------------------------------------------------ the merge
    def absorb(self, pairs: lora.Factors) -> None:
        """Fold the finished task's pairs into tau (default: consecutive merging)."""
        for n, (a, b, s) in pairs.items():
            self.tau[n] = consecutive_merge(self.tau.get(n), lora.lora_delta(a, b, s))

    def _snapshot_w0(self, names) -> None:
        for n in names:
            if n not in self.w0:
                self.w0[n] = lora.base_weight(self.model.unet.get_submodule(n)).detach().clone()

    def _apply_tau(self) -> None:
        """Base weights := W_0 + tau (the same operations live and on resume: bit-identical)."""
        self._snapshot_w0(self.tau)
        with torch.no_grad():
            for n, d in self.tau.items():
                w = lora.base_weight(self.model.unet.get_submodule(n))
                w.copy_(self.w0[n].to(w) + d.to(w))

    # ------------------------------------------------------------------ training
    def add_task_adapter(self, task: Task) -> None:
        torch.manual_seed(self.seed * 1000 + task.index)
        s = self.settings
        lora.add_adapter(self.model.unet, merge_config(s.rank, s.alpha, s.targets), self.adapter)

    def end_task(self, task: Task) -> None:
        self.token_rows[task.index] = self.emb[self.token_id].detach().clone()
        pairs = {n: (a.detach().clone(), b.detach().clone(), s)
                 for n, (a, b, s) in lora.lora_pairs(self.model.unet, self.adapter).items()}
        self._snapshot_w0(pairs)
        self.absorb(pairs)
        self._apply_tau()
        lora.enable_adapters(self.model.unet, False)  # the task's product now lives in the base weights
        T2IMethod.end_task(self, task)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"task{i}.token": row.contiguous() for i, row in sorted(self.token_rows.items())}
        state.update({f"merged.{n}.delta": d.contiguous() for n, d in self.tau.items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        self.token_rows = self.restore_token_rows(state, tasks)
        self.tau = {k[len("merged."): -len(".delta")]: v.clone() for k, v in state.items()
                    if k.startswith("merged.") and k.endswith(".delta")}
        self._apply_tau()
        self.tasks_done = len(tasks)


@register("t2i", "lora_merge_consecutive")
class LoRAMergeConsecutive(LoRAMerge):
    """Merge & initialization (Staniszewski et al., arXiv 2410.04891; code luk-st/continual-lora ``merge_and_init``).

    tau_t = tau_{t-1} + s B_t A_t, W_t = W_0 + tau_t; a fresh LoRA per task trained on W_{t-1}.
    """

    paper = ("Staniszewski et al., Low-Rank Continual Personalization of Diffusion Models, arXiv:2410.04891 - "
             "consecutive merging (merge & init)")
