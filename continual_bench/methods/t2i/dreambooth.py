"""DreamBooth trained sequentially: the whole UNet fine-tuned per concept, with class-prior preservation.

Paper: Ruiz, Li, Jampani, Pritch, Rubinstein, Aberman, "DreamBooth: Fine Tuning Text-to-Image Diffusion
Models for Subject-Driven Generation", CVPR 2023 (arXiv 2208.12242); one of the baselines
of C-LoRA (Smith et al., "Continual Diffusion", TMLR 2024, arXiv 2304.06027).

Equation (DreamBooth's class-specific prior-preservation loss, written from the paper; numbering not re-checked):

    L = E_{z, c, eps, t} || target - f_theta(z_t, t, c) ||^2
        + lambda_prior * E_{z_pr, c_pr, eps', t'} || target' - f_theta(z_pr,t', t', c_pr) ||^2,

c = the concept prompt, c_pr = "a photo of a {class_word}", z_pr the latents of ``n_class_images``
images that the model itself generates from c_pr at the start of the task (frozen sampler, seeded from
(seed, task)); they are VAE-encoded once and a fresh noise/timestep is drawn each step, as for the
concept images. target is eps or the velocity, as the backbone's scheduler says. All UNet weights train;
the VAE and the text encoder are frozen.

Choices, stated:
- Sequential: task t starts from the UNet after task t-1, and its class images come from that model
  (the model "at the start of the task", so the prior kept is the current one, not the original one).
- ``prior_weight`` defaults to 1.0, diffusers' example value (``--prior_loss_weight=1.0``): prior preservation
  is what distinguishes DreamBooth from plain fine-tuning (``prior_weight: 0`` gives that ablation), and
  the suite measures exactly what it is meant to protect (relevant-concept forgetting, ``Frel_*``, on the
  class prompt). Its cost is ``n_class_images`` generations per task (16 at 15 DDIM steps on the toy
  backbone: about 7 s on one busy CPU core) and a second UNet pass per step.
- Identifier: DreamBooth binds a rare token with a fixed embedding ("a [V] dog"); here the token is the
  suite's new random row (C-LoRA's customized-token protocol) and the prompt is the engine's "a photo of <vK>"
  without the class word, as for every method. The row is frozen by default, like DreamBooth's rare
  token (``token_lr > 0`` trains it as well).

State after task t: the full UNet weights + every concept's token row (exact resume).
N_train = all UNet parameters (+ the row if it trains); N_store = all UNet parameters + T rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...utils import UserError, stable_seed
from ..base import T2IMethod, Task, TrainSettings
from ..registry import register
from .lora_sequential import freeze_all_but_token


@dataclass
class DreamBoothSettings(TrainSettings):
    # Toy profile. Paper profile: 5e-6 for all non-LoRA methods (C-LoRA paper, experiment setup).
    lr: float = 2e-4  # all UNet weights; measured: toy_faces seed 0, concept 1, 120 steps x 8: oracle 32/32
    token_lr: float = 0.0  # 0: the identifier row stays at its (random) init, as DreamBooth's rare token
    prior_weight: float = 1.0  # lambda of the prior-preservation term; 0 = off (plain fine-tuning)
    n_class_images: int = 16  # generated at the start of each task (diffusers' example: 100-200 on SD)
    class_sample_steps: int = 15  # DDIM steps for the class images
    class_guidance: float = 5.0  # classifier-free guidance for the class images


@register("t2i", "dreambooth")
class DreamBooth(T2IMethod):
    """DreamBooth, sequential (Ruiz et al., CVPR 2023, arXiv 2208.12242), prior-preservation loss.

    L = ||target - f(z_t, c)||^2 + prior_weight * ||target' - f(z_pr,t', c_pr)||^2, all UNet weights trained;
    the prior latents z_pr come from images the model generates for "a photo of a {class_word}".
    """

    paper = "Ruiz et al., DreamBooth, CVPR 2023, arXiv:2208.12242"
    Settings = DreamBoothSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        self.rows: dict[int, torch.Tensor] = {}
        self.prior: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) of the class latents
        self.prior_text: torch.Tensor | None = None

    @staticmethod
    def class_prompt(task: Task) -> str:
        return f"a photo of a {task.class_word}"

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)  # random-init identifier row (C-LoRA convention)
        self.token_id = self.model.token_id(task.token)
        self.emb = freeze_all_but_token(self.model, [self.token_id]) if self.settings.token_lr > 0 else None
        self.prior = self.prior_text = None
        if self.settings.prior_weight > 0:
            self._make_prior(task)
        self.model.unet.requires_grad_(True)

    def _make_prior(self, task: Task) -> None:
        s = self.settings
        if not task.class_word:
            raise UserError("dreambooth: prior preservation needs the benchmark's class word "
                            "(Task.class_word is empty); set method_settings.dreambooth.prior_weight: 0")
        if s.n_class_images < 1:
            raise UserError(f"method_settings.dreambooth.n_class_images: expected >= 1, got {s.n_class_images}")
        prompt = self.class_prompt(task)
        imgs = self.model.generate([prompt] * s.n_class_images, seed=stable_seed("dreambooth-prior", self.seed, task.index),
                                   steps=s.class_sample_steps, guidance=s.class_guidance)
        x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 255.0
        self.prior = self.model.latent_dist(x)  # encoded once
        with torch.no_grad():
            self.prior_text = self.model.encode_text([prompt])

    def prior_loss(self, batch: dict) -> torch.Tensor:
        """The prior-preservation term on a batch (as large as the concept batch) of the class latents."""
        mean, std = self.prior
        n = len(batch["prompts"])
        g = batch["generator"]
        idx = torch.randint(0, len(mean), (n,), generator=g)
        lat = self.model.sample_latents(mean[idx], std[idx], g)
        return self.model.diffusion_loss(lat, self.prior_text.expand(n, -1, -1), generator=g)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().loss(batch)
        if self.prior is not None:
            out["instance"] = out["loss"]
            out["prior"] = self.prior_loss(batch)
            out["loss"] = out["instance"] + self.settings.prior_weight * out["prior"]
        return out

    def param_groups(self) -> list[dict]:
        groups = [{"params": list(self.model.unet.parameters()), "lr": self.settings.lr,
                   "weight_decay": self.settings.weight_decay}]
        if self.emb is not None:
            groups.append({"params": [self.emb], "lr": self.settings.token_lr, "weight_decay": 0.0})
        return groups

    def n_trained(self) -> int:
        n = sum(p.numel() for p in self.model.unet.parameters())
        return n + (int(self.model.token_embeddings().shape[1]) if self.emb is not None else 0)

    def end_task(self, task: Task) -> None:
        self.rows[task.index] = self.model.token_embeddings()[self.token_id].detach().clone()
        self.model.unet.requires_grad_(False)
        self.model.token_embeddings().requires_grad_(False)
        self.prior = self.prior_text = None
        super().end_task(task)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"task{i}.token": v.contiguous() for i, v in sorted(self.rows.items())}
        state.update({f"unet.{k}": v.detach().contiguous() for k, v in self.model.unet.state_dict().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        self.rows.update(self.restore_token_rows(state, tasks))
        unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        self.model.unet.load_state_dict(unet, strict=True)
        self.tasks_done = len(tasks)
