"""The judge: an open_clip CLIP model that gives the evaluation features.

Paper profile: OpenAI CLIP ViT-B/32 (Custom Diffusion's and CIDM's evaluation model). Toy world: a tiny
open_clip CLIP trained contrastively (InfoNCE, open_clip's ``ClipLoss``) on the toy world's generic images
and their attribute captions, so that its image features separate the attributes identities differ in.
Both live in an open_clip ``local-dir`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``)
and are loaded by :func:`load_judge` through ``open_clip.create_model("local-dir:...")``.

KID features. The toy judge computes KID on its own CLIP image features. The paper profile's judge folder
(built by :func:`continual_bench.data.model_resources.build_paper_judge`) also holds ``judge.json`` and
torch-fidelity's InceptionV3 weights: :func:`load_judge` then loads that Inception as torchmetrics'
``NoTrainInceptionV3`` (the module ``KernelInceptionDistance(feature=2048)`` would build, here from the local
file, so nothing is downloaded) and :meth:`Judge.kid_features` returns its 2048-d pool features, on which
KID is computed as the papers do; CLIP alignment keeps using CLIP.
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

    def __init__(self, model, tokenizer, image_size: int, mean, std, device="cpu", kid_extractor=None):
        self.kid_extractor = kid_extractor.eval().to(device) if kid_extractor is not None else None
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
    def kid_features(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Features KID is computed on: Inception pool features (paper judge) or the CLIP image features."""
        if self.kid_extractor is None:
            return self.image_features(x, normalize=False)
        out = []
        for i in range(0, len(x), batch_size):  # torchmetrics' conversion of [0, 1] floats (normalize=True)
            imgs = (x[i:i + batch_size].clamp(0, 1) * 255).byte().to(self.device)
            out.append(self.kid_extractor(imgs).reshape(len(imgs), -1))
        return torch.cat(out).double().cpu()

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        feats = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float().cpu()
        return F.normalize(feats, dim=-1)


JUDGE_FILE = "judge.json"


def load_inception(weights: str | Path):
    """torchmetrics' NoTrainInceptionV3 (2048-d pool features) from a local torch-fidelity weights file."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"{weights}: Inception weights for KID missing; fetch them (continual-bench fetch-models "
                        "--model inception_kid, then build-paper-judge) or set paper.offline: false")
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights))


def load_judge(path: str | Path, device: str = "cpu") -> Judge:
    """The judge in ``path``: an open_clip local-dir, plus Inception for KID when ``judge.json`` says so."""
    path = Path(path)
    spec_file = path / JUDGE_FILE
    if spec_file.is_file():
        try:
            spec = json.loads(spec_file.read_text())
        except ValueError as exc:
            raise UserError(f"{spec_file}: not valid JSON ({exc})") from None
        kid = spec.get("kid_features", "clip")
        if kid not in ("clip", "inception"):
            raise UserError(f"{spec_file}: kid_features must be 'clip' or 'inception', got {kid!r}")
        clip_dir = path / spec.get("clip", ".")
        extractor = load_inception(path / spec.get("inception_weights", "")) if kid == "inception" else None
        return _load_open_clip(clip_dir, device, kid_extractor=extractor)
    return _load_open_clip(path, device)


def _load_open_clip(path: Path, device: str, kid_extractor=None) -> Judge:
    import open_clip

    cfg_file = path / "open_clip_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file}: missing; the judge model has not been built or fetched")
    if not any((path / f).is_file() for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        raise UserError(f"{path}: no open_clip_model.safetensors; the judge's weights have not been fetched")
    cfg = json.loads(cfg_file.read_text())
    model = open_clip.create_model(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    pre = cfg.get("preprocess_cfg", {})
    size = cfg["model_cfg"]["vision_cfg"]["image_size"]
    return Judge(model, tokenizer, size, pre.get("mean", [0.48145466, 0.4578275, 0.40821073]),
                 pre.get("std", [0.26862954, 0.26130258, 0.27577711]), device, kid_extractor=kid_extractor)


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
