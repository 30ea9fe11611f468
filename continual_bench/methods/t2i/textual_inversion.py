"""Textual Inversion: one new word embedding per concept, nothing else trains.

Paper: Gal, Alaluf, Atzmon, Patashnik, Bermano, Chechik, Cohen-Or, "An Image is Worth One Word:
Personalizing Text-to-Image Generation using Textual Inversion", ICLR 2023 (arXiv 2208.01618);
one of the baselines of C-LoRA (Smith et al., "Continual Diffusion", TMLR 2024, arXiv 2304.06027).

Equation (Textual Inversion's optimisation objective, written from the paper; numbering not re-checked):
the embedding v_* of the pseudo-word S_* is the only variable,

    v_* = argmin_v  E_{z ~ E(x), y, eps ~ N(0, 1), t} || eps - eps_theta(z_t, t, c_theta(y; v)) ||_2^2,

with the UNet eps_theta, the text encoder c_theta and the VAE E frozen (the target is the velocity instead
of eps for v-prediction backbones; see ``T2IModel.diffusion_loss``). In this suite the concept token
``<vK>`` is a new vocabulary row per task and the prompt is the engine's "a photo of <vK>" without a
class word (C-LoRA's customized-token protocol), so every method is trained and evaluated on the same prompts.

Initialisation: Textual Inversion initialises v_* from a coarse descriptor word ("sculpture", "cat").
Here the row is random (the suite's C-LoRA convention, ``T2IModel.add_concept_token``) by default;
``init_from_class_word: true`` starts it at the mean embedding of the task's class word's sub-tokens
instead (the paper's choice; the prompt is unchanged).

No model weight changes, so earlier concepts cannot be forgotten: their rows are frozen and nothing
they are read through moves (the method's forgetting is zero by construction; its limit is plasticity).
N_train = the embedding width; N_store = T x embedding width after T tasks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import T2IMethod, Task, TrainSettings, setting
from ..registry import register
from .lora_sequential import freeze_all_but_token


@dataclass
class TextualInversionSettings(TrainSettings):
    # Only one row trains, so the toy profile uses a larger step than the LoRA methods' token_lr (2e-2).
    # Paper profile: the authors' configuration uses a base lr of 5e-3 scaled by batch size x GPUs
    # (unverified here: not read in the paper). C-LoRA's "5e-6 for all non-LoRA methods" is meant for
    # weight fine-tuning; at that rate a single embedding row would barely move.
    lr: float = setting(5e-2, "learning rate of the concept token's embedding row (measured: toy_faces seed 0, "
                        "concept 1, 120 steps x 8: oracle 32/32 on its samples)", gt=0)
    init_from_class_word: bool = setting(False, "True: start at the class word's embedding (the paper), else random")


@register("t2i", "textual_inversion")
class TextualInversion(T2IMethod):
    """Textual Inversion (Gal et al., ICLR 2023, arXiv 2208.01618): only the concept token's row trains.

    v_* = argmin_v E || eps - eps_theta(z_t, t, c_theta("a photo of <vK>"; v)) ||^2, all weights frozen.
    """

    paper = "Gal et al., An Image is Worth One Word (Textual Inversion), ICLR 2023, arXiv:2208.01618"
    Settings = TextualInversionSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        self.rows: dict[int, torch.Tensor] = {}  # task index -> its learned embedding row

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        init = self._class_word_embedding(task.class_word) if self.settings.init_from_class_word else None
        if init is None:
            super().begin_task(task)  # random init (C-LoRA convention)
        else:
            self.model.add_concept_token(task.token, init=init)
        self.token_id = self.model.token_id(task.token)
        self.emb = freeze_all_but_token(self.model, [self.token_id])

    def _class_word_embedding(self, word: str) -> torch.Tensor | None:
        if not word:
            return None
        ids = self.model.tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            return None
        return self.model.token_embeddings()[ids].detach().mean(0).clone()

    def param_groups(self) -> list[dict]:
        # weight decay 0: AdamW would otherwise shrink every row of the table, not only the concept's
        return [{"params": [self.emb], "lr": self.settings.lr, "weight_decay": 0.0}]

    def n_trained(self) -> int:
        return int(self.model.token_embeddings().shape[1])

    def end_task(self, task: Task) -> None:
        self.rows[task.index] = self.emb[self.token_id].detach().clone()
        self.emb.requires_grad_(False)
        super().end_task(task)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"task{i}.token": v.contiguous() for i, v in sorted(self.rows.items())}

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        self.rows.update(self.restore_token_rows(state, tasks))
        self.tasks_done = len(tasks)
