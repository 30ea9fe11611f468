"""Sequential LoRA on the UNet's cross-attention key/value projections (the "LoRA" baseline of C-LoRA).

Paper: Smith et al., "Continual Diffusion: Continual Customization of Text-to-Image Diffusion with
C-LoRA", TMLR 2024 (arXiv 2304.06027), sec. 3.1 and the sequential-LoRA baseline of Table 1.
LoRA itself: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

Equation (C-LoRA eq. 1, with the self-regularization of eq. 2 switched off): for every cross-attention
projection W in {W_K, W_V} (``attn2.to_k``, ``attn2.to_v``), task t trains a fresh low-rank pair on top
of the frozen sum of the past ones,

    W_t = W_init + sum_{t' < t} A_t' B_t' + A_t B_t,       L = L_diffusion,

where peft stores the pair as ``lora_B @ lora_A`` (scaled by alpha / rank). The customized token is a new,
randomly initialised embedding per concept and the prompt leaves out the class word ("a photo of <v1>",
C-LoRA sec. 3.3); its embedding row trains with the LoRA. Nothing protects earlier concepts: this is the
baseline whose forgetting C-LoRA's penalty (``c_lora``) is meant to reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lora
from ..base import T2IMethod, Task, TrainSettings, setting
from ..lora import lora_delta, lora_pairs  # noqa: F401 (the plugin API: README, docs/adding-a-method.md)
from ..registry import register

CROSS_ATTN_KV = ["attn2.to_k", "attn2.to_v"]  # suffix match: cross-attention only, not self-attention


@dataclass
class LoRASettings(TrainSettings):
    rank: int = setting(4, "LoRA rank of the cross-attention K/V adapters (paper profile: 16, C-LoRA sec. 4)", min=1)
    alpha: float = setting(4.0, "LoRA alpha: the update is scaled by alpha / rank", gt=0)
    lr: float = setting(5e-3, "learning rate of the LoRA weights (paper profile: 5e-4)", gt=0)
    token_lr: float = setting(2e-2, "learning rate of the concept token's embedding row; 0 = the row stays at its init",
                              min=0)


def lora_config(rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=CROSS_ATTN_KV)


def freeze_all_but_token(model, token_ids: list[int]) -> torch.nn.Parameter:
    """Make the embedding table trainable but zero every gradient row except ``token_ids``.

    With Adam(W) and weight decay 0 a row whose gradient is always zero never moves, so only the
    concept tokens train (the same trick as diffusers' textual-inversion/custom-diffusion examples).
    """
    emb = model.token_embeddings()
    emb.requires_grad_(True)
    mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
    mask[token_ids] = 1.0
    emb.register_hook(lambda g: g * mask)
    return emb


@register("t2i", "lora_sequential")
class LoRASequential(T2IMethod):
    """Sequential LoRA (C-LoRA paper's baseline; Smith et al. TMLR 2024, eq. 1 without eq. 2's penalty).

    W_t = W_init + sum_{t'<t} A_t' B_t' + A_t B_t on cross-attention K/V; loss = diffusion loss only.
    """

    paper = "Smith et al., Continual Diffusion (C-LoRA), TMLR 2024, arXiv:2304.06027 - sequential LoRA baseline"
    Settings = LoRASettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        # per finished task, flat tensor entries: "<module>.A", "<module>.B", "<module>.scaling" (a 0-d tensor; the
        # toolkit's layout, continual_bench.methods.lora) and "token" (its embedding row); subclasses may add their
        # own (LFS-Diffusion: "icgen_context")
        self.past: list[dict[str, torch.Tensor]] = []
        self.token_rows: dict[int, torch.Tensor] = {}
        self.adapter = "default"  # the peft adapter of the task being trained

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, entry in enumerate(self.past, start=1):
            for k, v in entry.items():
                state[f"task{i}.{k}"] = v.contiguous()
        return state

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        for task in tasks:
            entry = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"task{task.index}.")}
            self.model.add_concept_token(task.token, init=entry["token"])
            self._fold(entry)
            self.past.append(entry)
        self.tasks_done = len(tasks)

    def _fold(self, entry: dict[str, torch.Tensor]) -> None:
        """Add a finished task's frozen product A_t B_t into the base weights."""
        lora.fold(self.model.unet, lora.factors_of(entry))

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.add_task_adapter(task)
        self.token_id = self.model.token_id(task.token)
        self.emb = freeze_all_but_token(self.model, [self.token_id])

    def add_task_adapter(self, task: Task) -> None:
        """A fresh LoRA on the cross-attention K/V for ``task`` (seeded: peft's gaussian init draws from the global
        RNG), named ``self.adapter``."""
        torch.manual_seed(self.seed * 1000 + task.index)
        lora.add_adapter(self.model.unet, lora_config(self.settings.rank, self.settings.alpha), self.adapter)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return lora.lora_parameters(self.model.unet, self.adapter)

    def param_groups(self) -> list[dict]:
        return [{"params": self.lora_parameters(), "lr": self.settings.lr, "weight_decay": self.settings.weight_decay},
                {"params": [self.emb], "lr": self.settings.token_lr, "weight_decay": 0.0}]

    def n_trained(self) -> int:
        return sum(p.numel() for p in self.lora_parameters()) + self.emb.shape[1]

    def end_task(self, task: Task) -> None:
        entry = {"token": self.emb[self.token_id].detach().clone()}
        entry.update(lora.factors_to_state(lora_pairs(self.model.unet, self.adapter)))
        self.past.append(entry)
        super().end_task(task)
