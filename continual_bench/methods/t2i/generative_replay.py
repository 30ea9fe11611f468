"""Generative replay: the model's own samples of past concepts stand in for their data.

Paper: Shin, Lee, Kim, Kim, "Continual Learning with Deep Generative Replay", NeurIPS 2017 (the solver's
training objective, which mixes new real data and replayed data with a ratio r), applied to text-to-image diffusion as the "generative replay" baseline of C-LoRA (Smith et al.,
"Continual Diffusion", TMLR 2024, arXiv 2304.06027, Table 1), where the diffusion model is its own
generator (no separate generator/solver pair).

Equation (Shin et al.'s mixed objective with the diffusion loss as the solver's loss; the equation is
written here from the paper's description, its numbering not re-checked): before task t the current model
(the state after task t-1, frozen for this purpose) generates ``n_replay`` images x' of every past concept
k < t from its prompt p_k; task t then trains on the mixture

    L = r * E_{(x, p_t) ~ D_t} [ L_diff(x, p_t) ] + (1 - r) * E_{(x', p_k) ~ replay} [ L_diff(x', p_k) ],

with r the importance of the new task (Shin et al.: "the ratio of mixing real data"); ``new_ratio = 0``
means r = 1/t, every concept seen so far weighted equally. In a batch the two expectations are the means
of the per-sample diffusion losses of its real and its replayed samples (a batch with only one kind uses
that kind's mean); batches are drawn uniformly from the union of the task's images and the replayed ones
(both with flipped copies). No real image of a past concept is used.

The adapter is ``lora_sequential``'s (it subclasses it: a fresh LoRA on cross-attention K/V per task,
folded afterwards, a new random token row): only the replay term differs, so the comparison with
``lora_sequential`` and ``c_lora`` isolates it. Replayed images are regenerated from the checkpoint at
every (re)start of a task, deterministically, and never stored: N_store equals ``lora_sequential``'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...utils import stable_seed
from ..base import Task, setting
from ..registry import register
from .lora_sequential import LoRASequential, LoRASettings


@dataclass
class GenerativeReplaySettings(LoRASettings):
    n_replay: int = setting(16, "generated images per past concept (toy: as many as its real images; paper: unstated)",
                            min=1)
    replay_steps: int = setting(15, "DDIM steps of the replay sampler (toy evaluation's; paper profile: 50)", min=1)
    replay_guidance: float = setting(5.0, "classifier-free guidance of the replay sampler (as evaluation)", min=0)
    new_ratio: float = setting(0.0, "r, weight of the new task's loss; 0 = 1/t (Shin et al.'s equal importance)",
                               min=0, max=1)


def mix_losses(per_sample: torch.Tensor, is_replay: torch.Tensor, r: float) -> torch.Tensor:
    """Shin et al.'s mixed objective on one batch: r * mean(real losses) + (1 - r) * mean(replayed losses).

    A batch without replayed (or without real) samples gives the mean of the kind it has.
    """
    real, rep = per_sample[~is_replay], per_sample[is_replay]
    if not len(rep):
        return real.mean()
    if not len(real):
        return rep.mean()
    return r * real.mean() + (1 - r) * rep.mean()


@register("t2i", "generative_replay")
class GenerativeReplay(LoRASequential):
    """Deep generative replay (Shin et al., NeurIPS 2017) with the diffusion model as its own generator.

    L = r L_diff(D_t) + (1 - r) L_diff(samples of past concepts from the model after task t-1); LoRA on K/V.
    """

    paper = ("Shin et al., Continual Learning with Deep Generative Replay, NeurIPS 2017; generative-replay "
             "baseline of Smith et al., Continual Diffusion (C-LoRA), TMLR 2024, arXiv:2304.06027")
    Settings = GenerativeReplaySettings

    def begin_task(self, task: Task) -> None:
        # replay first: the model is exactly the state after task t-1 (no new token, no new adapter yet)
        s = self.settings
        self.replay_images, self.replay_prompts = torch.empty(0), []
        chunks = []
        for p in task.past:
            prompt = self.prompt(p)
            arr = self.model.generate([prompt] * s.n_replay, seed=stable_seed("replay", self.seed, task.index, p.index),
                                      steps=s.replay_steps, guidance=s.replay_guidance)
            chunks.append(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0)
            self.replay_prompts += [prompt] * len(arr)
        if chunks:
            self.replay_images = torch.cat(chunks)
        self.current_prompt = self.prompt(task)
        self.r = s.new_ratio if s.new_ratio > 0 else 1.0 / task.index
        super().begin_task(task)

    def training_data(self, task: Task) -> tuple[torch.Tensor, list[str]]:
        images, prompts = super().training_data(task)
        if not len(self.replay_images):
            return images, prompts
        return torch.cat([images, self.replay_images.to(images)]), prompts + self.replay_prompts

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        emb = self.model.encode_text(batch["prompts"])
        per = self.model.diffusion_loss(batch["latents"], emb, generator=batch["generator"], reduction="none")
        is_replay = torch.tensor([p != self.current_prompt for p in batch["prompts"]], device=per.device)
        return {"loss": mix_losses(per, is_replay, self.r), "replay_share": is_replay.float().mean()}
