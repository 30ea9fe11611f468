"""Pretraining of the toy text-to-image backbone (the toy world's stand-in for Stable Diffusion).

Three stages, each a DAG rule:

1. ``pretrain_vae``: a tiny ``AutoencoderKL`` (32x32x3 <-> 8x8x8) on the generic images, MSE + a small KL
   term (Stable Diffusion's VAE adds perceptual and adversarial losses; at 32x32 on flat cartoon images MSE
   suffices). Its ``scaling_factor`` is set to 1/std of the latents, as SD's 0.18215 was.
2. ``pretrain_text_encoder``: a tiny transformers ``CLIPModel`` trained contrastively on the generic images
   and their attribute captions; its text tower becomes the pipeline's ``CLIPTextModel``, as Stable
   Diffusion v1 conditions on a CLIP text encoder trained contrastively beforehand. (A text encoder
   trained jointly with the UNet from scratch bound captions too weakly within the CPU budget: at 1,200
   steps "a photo of a waterfall" still produced faces.)
3. ``pretrain_t2i``: ``UNet2DConditionModel`` trained from scratch with the diffusion (epsilon) loss,
   the text encoder frozen (as in SD), on captions with random phrase dropout so that partial captions
   and the bare "a photo of a person" work, and 10 % empty captions for classifier-free guidance. The
   result is saved as a ``StableDiffusionPipeline`` directory.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.datasets import PreparedDataset
from ..utils import atomic_write_json, seed_everything, stable_seed
from . import t2i

log = logging.getLogger(__name__)


def _generic_images(data_dirs) -> tuple[torch.Tensor, list[str]]:
    imgs, caps = [], []
    for d in data_dirs:
        ds = PreparedDataset(d)
        recs = ds.records(concept="generic")
        imgs.append(ds.images(concept="generic"))
        caps += [r.caption for r in recs]
    return torch.cat(imgs), caps


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1
    return f


def pretrain_vae(data_dirs, out_dir, *, steps: int = 1600, batch_size: int = 16, lr: float = 2e-3,
                 kl_weight: float = 1e-6, seed: int = 0, cfg: t2i.ToyT2IConfig | None = None) -> dict:
    cfg = cfg or t2i.ToyT2IConfig()
    seed_everything(seed)
    x, _ = _generic_images(data_dirs)
    x = x * 2 - 1
    vae = t2i.build_toy_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, steps))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in (bar := tqdm(range(steps), desc="pretrain vae", mininterval=5)):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        batch = x[idx]
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse = F.mse_loss(rec, batch)
        loss = mse + kl_weight * post.kl().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain_vae: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, min(len(x), 1024), 256)])
        rec = vae.decode(lat[:256]).sample
        val_mse = F.mse_loss(rec, x[:256]).item()
    sf = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=sf)
    out_dir = Path(out_dir)
    vae.save_pretrained(str(out_dir), safe_serialization=True)
    stats = {"steps": steps, "batch_size": batch_size, "recon_mse": val_mse, "scaling_factor": sf,
             "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out_dir / "pretrain_stats.json", stats)
    log.info("vae: %s", stats)
    return stats


def pretrain_text_encoder(data_dirs, tokenizer_dir, out_dir, *, steps: int = 400, batch_size: int = 128,
                          lr: float = 2e-3, keep: float = 0.8, seed: int = 0,
                          cfg: t2i.ToyT2IConfig | None = None) -> dict:
    """Contrastive (CLIP) pretraining; saves the text tower as a ``CLIPTextModel`` at ``out_dir``."""
    from transformers import CLIPConfig, CLIPModel

    cfg = cfg or t2i.ToyT2IConfig()
    seed_everything(seed)
    x, captions = _generic_images(data_dirs)
    tokenizer = t2i.load_tokenizer(tokenizer_dir)
    text_encoder = t2i.build_toy_text_encoder(cfg, tokenizer)
    clip = CLIPModel(CLIPConfig(
        text_config=text_encoder.config.to_dict(), projection_dim=cfg.text_width,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=cfg.image_size, patch_size=4)))
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(40, steps))
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(stable_seed("te-caption-dropout", seed))
    t0 = time.time()
    losses = []
    for step in (bar := tqdm(range(steps), desc="pretrain text encoder", mininterval=5)):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        caps = [caption_dropout(captions[i], rng, keep) for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        img = x[idx]
        img = torch.where((torch.rand(batch_size, generator=g) < 0.5).view(-1, 1, 1, 1), img.flip(-1), img)
        loss = clip(input_ids=ids, pixel_values=img * 2 - 1, return_loss=True).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain_text_encoder: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    text_state = {k[len("text_model."):]: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    text_encoder.load_state_dict(text_state)
    text_encoder.save_pretrained(str(out_dir), safe_serialization=True)
    stats = {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.time() - t0, 1)}
    atomic_write_json(Path(out_dir) / "pretrain_stats.json", stats)
    log.info("text encoder: %s", stats)
    return stats


def caption_dropout(caption: str, rng: np.random.Generator, keep: float) -> str:
    """Drop attribute phrases at random: '... with A, B and C' -> '... with A and C' (or the bare prompt)."""
    if " with " not in caption:
        return caption
    head, tail = caption.split(" with ", 1)
    parts = [p.strip() for p in tail.replace(" and ", ", ").split(",") if p.strip()]
    kept = [p for p in parts if rng.random() < keep]
    if not kept:
        return head
    if len(kept) == 1:
        return f"{head} with {kept[0]}"
    return f"{head} with {', '.join(kept[:-1])} and {kept[-1]}"


def pretrain_t2i(data_dirs, vae_dir, tokenizer_dir, text_encoder_dir, out_dir, *, steps: int = 1000, batch_size: int = 32,
                 lr: float = 2e-3, keep: float = 0.8, empty_prob: float = 0.1, seed: int = 0,
                 cfg: t2i.ToyT2IConfig | None = None) -> dict:
    """Train the toy UNet on the frozen text encoder; save a StableDiffusionPipeline at ``out_dir``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    seed_everything(seed)
    x, captions = _generic_images(data_dirs)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    tokenizer = t2i.load_tokenizer(tokenizer_dir)
    sf = vae.config.scaling_factor
    with torch.no_grad():  # cache the latent distributions once: the VAE is frozen
        params = [vae.encode(x[i:i + 256] * 2 - 1).latent_dist for i in range(0, len(x), 256)]
        mean = torch.cat([p.mean for p in params])
        std = torch.cat([p.std for p in params])
    latent_size = mean.shape[-1]
    cfg = cfg or t2i.ToyT2IConfig.for_latent_size(latent_size)
    text_encoder = CLIPTextModel.from_pretrained(str(text_encoder_dir)).eval().requires_grad_(False)
    unet = t2i.build_toy_unet(cfg, latent_size)
    noise_sched = t2i.training_scheduler()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps))
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(stable_seed("caption-dropout", seed))
    t0 = time.time()
    losses = []
    for step in (bar := tqdm(range(steps), desc="pretrain t2i", mininterval=5)):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        caps = ["" if rng.random() < empty_prob else caption_dropout(captions[i], rng, keep) for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            enc = text_encoder(ids)[0]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        noisy = noise_sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, enc).sample
        loss = F.mse_loss(pred, t2i.diffusion_target(noise_sched, lat, noise, t))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain_t2i: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    t2i.save_pipeline(vae, text_encoder, tokenizer, unet, out_dir)
    stats = {"steps": steps, "batch_size": batch_size, "lr": lr, "final_loss": float(np.mean(losses[-100:])),
             "seconds": round(time.time() - t0, 1),
             "params_unet": sum(p.numel() for p in unet.parameters()),
             "params_text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    atomic_write_json(Path(out_dir) / "pretrain_stats.json", stats)
    log.info("t2i: %s", stats)
    return stats
