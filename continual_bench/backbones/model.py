"""``T2IModel``: the parts of a loaded Stable Diffusion (or toy) pipeline that methods act on.

A method changes the model through this object (adds a concept token, wraps modules with LoRA, ...);
the engine trains with :meth:`diffusion_loss`; evaluation samples with :meth:`generate`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .t2i import diffusion_target, load_pipeline


class T2IModel:
    def __init__(self, pipe, device: str = "cpu"):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.device = device
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.image_size = self.unet.config.sample_size * pipe.vae_scale_factor
        self.concept_tokens: list[str] = []

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "T2IModel":
        return cls(load_pipeline(path, device=device), device)

    # ----------------------------------------------------------------------------------- tokens
    def add_concept_token(self, token: str, generator: torch.Generator | None = None,
                          init: torch.Tensor | None = None) -> int:
        """Add ``token`` to the vocabulary with a new embedding row, random-init unless ``init`` is given.

        Random init with the embedding table's own scale follows C-LoRA (sec. 3.3): the concept token
        carries no prior meaning and the prompt has no class word.
        """
        if token in self.tokenizer.get_vocab():
            raise ValueError(f"token {token!r} already exists in the tokenizer")
        self.tokenizer.add_tokens([token])
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        emb = self.text_encoder.get_input_embeddings().weight
        tid = self.tokenizer.convert_tokens_to_ids(token)
        with torch.no_grad():
            if init is None:
                std = emb[:-1].std().item()
                init = torch.randn(emb.shape[1], generator=generator) * std
            emb[tid] = init.to(emb.dtype)
        self.concept_tokens.append(token)
        return tid

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def token_embeddings(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    # ----------------------------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts))[0]

    @torch.no_grad()
    def latent_dist(self, images: torch.Tensor, batch_size: int = 64):
        """Mean and std of the VAE posterior for images in [0, 1] (cache these; sample per step)."""
        means, stds = [], []
        for i in range(0, len(images), batch_size):
            d = self.vae.encode(images[i:i + batch_size].to(self.device, self.vae.dtype) * 2 - 1).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        return torch.cat(means), torch.cat(stds)

    def sample_latents(self, mean, std, generator=None) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * eps) * self.vae.config.scaling_factor

    def diffusion_loss(self, latents: torch.Tensor, text_emb: torch.Tensor, generator=None,
                       reduction: str = "mean") -> torch.Tensor:
        """The denoising loss ``|| target - f_theta(z_t, t, c) ||^2`` (Stable Diffusion's objective).

        ``target`` is the noise (epsilon prediction, SD v1.x) or the velocity (v prediction, SD 2.x and
        the toy backbone), as the pipeline's scheduler config says.
        """
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, text_emb).sample
        target = diffusion_target(self.noise_scheduler, latents, noise, t)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return loss.mean() if reduction == "mean" else loss

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int, steps: int = 25, guidance: float = 5.0,
                 guidance_rescale: float = 0.0, batch_size: int = 64, negative_prompt: str | None = None) -> np.ndarray:
        """Images (N, H, W, 3) uint8 for ``prompts`` (one image each), batched, deterministic in ``seed``."""
        out = []
        g = torch.Generator().manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            shape = (len(chunk), self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
            lat = torch.randn(shape, generator=g).to(self.device, self.unet.dtype)
            res = self.pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, latents=lat,
                            guidance_rescale=guidance_rescale,
                            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                            output_type="np").images
            out.append((np.clip(res, 0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(out)
