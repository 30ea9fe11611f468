"""The classification backbone: a timm ViT loaded from a local safetensors file, with prefix/prompt hooks.

Two worlds, one loader (:func:`load_vit`):

* paper profile: timm ``vit_base_patch16_224.augreg_in21k_ft_in1k`` (REFERENCE.md section 2; the untagged
  name resolves to other weights in recent timm). The weights are a local file fetched by a DAG rule:
  a ``.safetensors`` file, or a folder holding ``model.safetensors`` and timm's hub ``config.json``
  (``architecture``) or our ``vit_config.json``. Nothing is downloaded here.
* toy world: a tiny timm ``VisionTransformer`` built offline (``pretrained=False``) and pretrained by the DAG
  (:func:`pretrain_toy_vit`) on the *photo* rendition of ``toy_imagenet_r``; saved as ``model.safetensors``
  + ``vit_config.json``, so it loads exactly like the paper backbone.

Inputs are in [0, 1] without mean/std normalization, as in CODA-Prompt (REFERENCE.md section 2); the toy
backbone is pretrained on such inputs too.

:class:`ViTBackbone` runs timm's blocks one by one so methods can inject, per layer, **prefix** key/value
vectors (prefix-tuning: CODA-P, DualPrompt, L2P++; CODA-Prompt ``models/vit.py`` concatenates them to the
keys and values after the qkv projection, before splitting heads) or **prompt tokens** inserted after the
class token at the input (prompt-tuning: original L2P). With neither, the output equals timm's
``forward_features`` (tested).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import UserError, atomic_write_json, seed_everything, stable_seed

log = logging.getLogger(__name__)

CONFIG_NAME = "vit_config.json"
WEIGHTS_NAME = "model.safetensors"
PAPER_VIT = "vit_base_patch16_224.augreg_in21k_ft_in1k"


def _conv_stem_class():
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        """timm ``PatchEmbed`` whose linear patch projection is a small stack of strided 3x3 convolutions
        (total stride = patch size), each followed by GroupNorm(1) and GELU, on the input standardized as
        ``(x - 0.5) / 0.25`` (the backbone still takes [0, 1] images). "Early convolutions help transformers
        see better" (Xiao et al., NeurIPS 2021): a ViT with a convolutional stem trains far faster from
        scratch. Measured here (first version of ``toy_imagenet_r``): a plain linear patch embedding, or a
        stem without the normalizations, stayed at chance for 600 steps on the photos; this stem learned.
        The transformer blocks are timm's, unchanged."""

        def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=96, bias=True, **kwargs):
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             bias=bias, **kwargs)
            n_down = int(round(math.log2(patch_size)))
            if 2 ** n_down != patch_size:
                raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
            layers, c = [], in_chans
            for i in range(n_down):  # widths ramp up to embed_dim: e.g. 32, 48, 64 for 64 and patch 8
                c_out = max(16, embed_dim * (i + 2) // (n_down + 1))
                layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
                c = c_out
            layers.append(nn.Conv2d(c, embed_dim, 1, bias=bias))
            self.proj = nn.Sequential(*layers)

        def forward(self, x):
            return super().forward((x - 0.5) / 0.25)

    return ConvStemPatchEmbed


@dataclass
class ToyViTConfig:
    """A tiny ViT for 32x32 images (timm ``VisionTransformer`` keyword arguments)."""

    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 5  # >= 5 so the paper's prompt layers (CODA-P 0-4, DualPrompt 0-1 / 2-4) exist
    num_heads: int = 4
    mlp_ratio: float = 2.0
    conv_stem: bool = True  # a convolutional stem (_conv_stem_class) instead of the linear patch projection

    def timm_kwargs(self) -> dict:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "conv_stem": self.conv_stem}


# ------------------------------------------------------------------------------------------- prefix attention
def prefix_attention(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor | None, pv: torch.Tensor | None) -> torch.Tensor:
    """timm ``Attention.forward`` with prefix keys/values ``pk``, ``pv`` (B, P, D) prepended to k and v."""
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if pk is not None:
        P = pk.shape[1]
        k = torch.cat([pk.reshape(B, P, H, hd).permute(0, 2, 1, 3).to(k.dtype), k], dim=2)
        v = torch.cat([pv.reshape(B, P, H, hd).permute(0, 2, 1, 3).to(v.dtype), v], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = x.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", H * hd))
    x = attn.norm(x)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        raise NotImplementedError("gated attention is not supported by prefix_attention")
    return attn.proj_drop(attn.proj(x))


class ViTBackbone(nn.Module):
    """A timm ViT (no classifier head) with per-layer prefix and input prompt hooks."""

    def __init__(self, vit: nn.Module, info: dict | None = None):
        super().__init__()
        from timm.models.vision_transformer import Block

        if not all(type(b) is Block for b in vit.blocks):
            raise UserError("ViTBackbone supports timm VisionTransformer with standard Blocks only")
        if getattr(vit, "global_pool", "token") != "token" or vit.cls_token is None:
            raise UserError("ViTBackbone needs a class-token ViT (global_pool='token')")
        self.vit = vit
        self.info = dict(info or {})
        self.embed_dim = vit.embed_dim
        self.depth = len(vit.blocks)
        size = vit.patch_embed.img_size
        self.img_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def device(self) -> torch.device:
        return self.vit.cls_token.device

    def forward_features(self, x: torch.Tensor, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                         prompt_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed tokens (B, N, D). ``prefix[l] = (pk, pv)`` (B, P, D) for block ``l``;
        ``prompt_tokens`` (B, M, D) are inserted after the class token (after position embedding)."""
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        if prompt_tokens is not None:
            x = torch.cat([x[:, :1], prompt_tokens.to(x.dtype), x[:, 1:]], dim=1)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        for i, blk in enumerate(v.blocks):
            p = prefix.get(i) if prefix else None
            if p is None:
                x = blk(x)
            else:
                x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), p[0], p[1])))
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return v.norm(x)

    def forward(self, x: torch.Tensor, prefix=None, prompt_tokens=None) -> torch.Tensor:
        """The class-token feature (B, D) (timm's ``forward_head(pre_logits=True)``)."""
        return self.vit.forward_head(self.forward_features(x, prefix, prompt_tokens), pre_logits=True)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt methods' query: the class-token feature of a plain, no-grad pass (eval mode)."""
        was = self.training
        self.eval()
        out = self.forward(x)
        self.train(was)
        return out


# ------------------------------------------------------------------------------------------- save / load
def build_vit(model_name: str, kwargs: dict | None = None) -> nn.Module:
    """A timm ViT without classifier head, random weights (offline)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs or {})
    kwargs["num_classes"] = 0
    if model_name == "toy_vit":
        if kwargs.pop("conv_stem", False):
            kwargs["embed_layer"] = _conv_stem_class()
        return VisionTransformer(**kwargs)
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except RuntimeError as e:  # unknown model name
        raise UserError(f"timm cannot build {model_name!r}: {e}") from None


def save_vit(vit: nn.Module, out: str | Path, *, model_name: str, kwargs: dict, extra: dict | None = None) -> Path:
    """``<out>/model.safetensors`` (no head) + ``<out>/vit_config.json``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(out / WEIGHTS_NAME))
    atomic_write_json(out / CONFIG_NAME, {"model_name": model_name, "kwargs": kwargs, "input_range": [0, 1],
                                          **(extra or {})})
    return out


def _resolve(path: Path, model_name: str | None) -> tuple[Path, str, dict]:
    """(weights file, timm model name, kwargs) for a backbone path."""
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if (path / CONFIG_NAME).is_file():
            cfg = json.loads((path / CONFIG_NAME).read_text())
            name, kwargs = cfg["model_name"], cfg.get("kwargs", {})
        elif (path / "config.json").is_file():  # timm's hub layout: {"architecture": ..., ...}
            cfg = json.loads((path / "config.json").read_text())
            name, kwargs = cfg.get("architecture") or model_name, {}
        else:
            name, kwargs = model_name, {}
    else:
        weights, name, kwargs = path, model_name, {}
    if not weights.is_file():
        raise UserError(f"{weights}: ViT weights not found (expected a safetensors file; fetch or pretrain the backbone first)")
    if not name:
        raise UserError(f"{path}: no {CONFIG_NAME} or config.json says which ViT this is; give the model name")
    if name.startswith("vit_base_patch16_224."):  # timm's tagged names: the architecture is the prefix
        name = name.split(".")[0]
    return weights, name, kwargs


def load_vit(path: str | Path, model_name: str | None = None, device: str = "cpu") -> ViTBackbone:
    """A :class:`ViTBackbone` from a local safetensors file or folder (see module docstring); eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: ViT backbone not found (fetch or pretrain it first)")
    weights, name, kwargs = _resolve(path, model_name)
    vit = build_vit(name, kwargs)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: unreadable safetensors file ({e})") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    cfg = json.loads((path / CONFIG_NAME).read_text()) if path.is_dir() and (path / CONFIG_NAME).is_file() else {}
    bb = ViTBackbone(vit, info={"model_name": name, "path": str(path), **{k: v for k, v in cfg.items() if k != "kwargs"}})
    bb.requires_grad_(False)
    return bb.to(device).eval()


# ------------------------------------------------------------------------------------------- toy pretraining
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per image (the world already varies position, scale, rotation and colour;
    extra translations slowed pretraining down more than they helped)."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def ncm_accuracy(bb: ViTBackbone, x_tr, y_tr, x_te, y_te, batch: int = 512) -> float:
    """Nearest-class-mean accuracy (%) of frozen class-token features (cosine): how well the features transfer."""
    def feats(x):
        return F.normalize(torch.cat([bb(x[i:i + batch].float() / 255) for i in range(0, len(x), batch)]), dim=1)

    f_tr, f_te = feats(x_tr), feats(x_te)
    classes = torch.unique(y_tr)
    means = F.normalize(torch.stack([f_tr[y_tr == c].mean(0) for c in classes]), dim=1)
    pred = classes[(f_te @ means.T).argmax(1)]
    return float((pred == y_te).float().mean() * 100)


def pretrain_toy_vit(data: str | Path, out: str | Path, *, cfg: ToyViTConfig | None = None, steps: int = 1400,
                     batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0) -> Path:
    """Pretrain the toy ViT to classify the ``pretrain`` split (photo rendition) of a toy classification
    dataset: AdamW (weight decay 0.05), 50 warm-up steps then cosine, random flips. Writes
    ``model.safetensors`` + ``vit_config.json`` (with held-out photo accuracy and the nearest-class-mean
    accuracy of the frozen features on the continual-learning renditions, a transfer diagnostic)."""
    from ..data.cls_data import ClsDataset, load_split_tensor

    cfg = cfg or ToyViTConfig()
    ds = ClsDataset(data)
    seed_everything(stable_seed("toy_vit", seed))
    x, y = load_split_tensor(ds.split("pretrain"), size=cfg.img_size)
    g = torch.Generator().manual_seed(stable_seed("toy_vit_batches", seed))
    perm = torch.randperm(len(x), generator=g)
    n_val = max(len(x) // 10, 1)
    x_val, y_val, x_tr, y_tr = x[perm[:n_val]], y[perm[:n_val]], x[perm[n_val:]], y[perm[n_val:]]
    kwargs = cfg.timm_kwargs()
    vit = build_vit("toy_vit", kwargs)
    head = nn.Linear(vit.embed_dim, ds.n_classes)
    model = nn.Sequential(vit, head)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = min(50, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    t0, losses = time.time(), []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=g)
        xb = _augment(x_tr[idx].float() / 255, g)
        loss = F.cross_entropy(model(xb), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("toy vit step %d/%d loss %.3f (%.0fs)", step, steps, np.mean(losses[-50:]), time.time() - t0)
    model.eval()
    with torch.no_grad():
        val_acc = float((model(x_val.float() / 255).argmax(1) == y_val).float().mean() * 100)
    bb = ViTBackbone(vit).eval()
    diag = {}
    try:
        xtr, ytr = load_split_tensor(ds.split("train"), size=cfg.img_size)
        xte, yte = load_split_tensor(ds.split("test"), size=cfg.img_size)
        diag["ncm_acc_cl_renditions"] = round(ncm_accuracy(bb, xtr, ytr, xte, yte), 2)
    except UserError:
        pass
    info = {"pretrained_on": str(data), "split": "pretrain", "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "photo_val_acc": round(val_acc, 2), "loss_last": round(float(np.mean(losses[-50:])), 4),
            "seconds": round(time.time() - t0, 1), "toy_config": asdict(cfg), **diag}
    log.info("toy vit: %s", info)
    return save_vit(vit, out, model_name="toy_vit", kwargs=kwargs, extra=info)
