"""The judge: an open_clip CLIP model that gives the evaluation features.

Paper profile: OpenAI CLIP ViT-B/32 (Custom Diffusion's and CIDM's evaluation model). Toy world: a tiny
open_clip CLIP trained contrastively (InfoNCE, open_clip's ``ClipLoss``) on the toy world's generic images
and their attribute captions, so that its image features separate the attributes identities differ in.
Both live in an open_clip ``local-dir`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``)
and are loaded by :func:`load_judge` through ``open_clip.create_model("local-dir:...")``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..utils import UserError, atomic_write_json, seed_everything, stable_seed

log = logging.getLogger(__name__)

TOY_JUDGE_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
TOY_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}


class Judge:
    """Wraps an open_clip model: ``image_features`` takes images in [0, 1] of any size."""

    def __init__(self, model, tokenizer, image_size: int, mean, std, device="cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device = device

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, x: torch.Tensor, batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        out = [self.model.encode_image(self._prep(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
        feats = torch.cat(out).float().cpu()
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        feats = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float().cpu()
        return F.normalize(feats, dim=-1)


def load_judge(path: str | Path, device: str = "cpu") -> Judge:
    import open_clip

    path = Path(path)
    cfg_file = path / "open_clip_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file}: missing; the judge model has not been built or fetched")
    cfg = json.loads(cfg_file.read_text())
    model = open_clip.create_model(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    pre = cfg.get("preprocess_cfg", {})
    size = cfg["model_cfg"]["vision_cfg"]["image_size"]
    return Judge(model, tokenizer, size, pre.get("mean", [0.48145466, 0.4578275, 0.40821073]),
                 pre.get("std", [0.26862954, 0.26130258, 0.27577711]), device)


def train_toy_judge(data_dirs, out_dir, *, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                    seed: int = 0) -> dict:
    """Contrastive pretraining of the tiny judge on generic images + attribute captions."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from ..backbones.toy_pretrain import _generic_images

    seed_everything(seed)
    x, captions = _generic_images(data_dirs)
    model = open_clip.CLIP(**TOY_JUDGE_CFG, output_dict=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=TOY_JUDGE_CFG["text_cfg"]["context_length"])
    tokens = tokenizer(captions)
    mean = torch.tensor(TOY_PREPROCESS["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(TOY_PREPROCESS["std"]).view(1, 3, 1, 1)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(stable_seed("judge", seed))
    t0 = time.time()
    losses = []
    for step in (bar := tqdm(range(steps), desc="train judge", mininterval=5)):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        img = x[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        img = torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img)
        out = model((img - mean) / std, tokens[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_toy_judge: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    atomic_write_json(out_dir / "open_clip_config.json", {"model_cfg": TOY_JUDGE_CFG, "preprocess_cfg": TOY_PREPROCESS})
    stats = {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out_dir / "train_stats.json", stats)
    log.info("judge: %s", stats)
    return stats
