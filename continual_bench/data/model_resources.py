"""Pretrained models of the paper profile as local resources (``data_manifests/models.yaml``).

:func:`fetch_model` fetches one model's files into ``<resources>/<name>/`` with the dataset fetcher
(verified, resumable, checksum-locked; ``offline`` verifies what is there and names what is missing), turns
them into the local format the code loads, and writes ``fetched.json`` last (the workflow's output):

* ``diffusers`` (Stable Diffusion): the files already are a ``save_pretrained`` folder; loading it offline
  is :func:`continual_bench.backbones.t2i.load_pipeline`.
* ``open_clip_openai`` (CLIP ViT-B/32): OpenAI's JIT checkpoint becomes an open_clip ``local-dir``
  (``open_clip_config.json`` + ``open_clip_model.safetensors``), the judge's format.
* ``inception_weights``: torch-fidelity's InceptionV3 weights, used as they are.
* ``timm`` (ViT-B/16): ``model.safetensors`` + timm's ``config.json``, as
  :func:`continual_bench.backbones.vit.load_vit` reads them.

:func:`build_paper_judge` puts the converted CLIP and the Inception weights into one judge folder with a
``judge.json`` that tells :func:`continual_bench.evaluation.judge.load_judge` to compute KID on Inception
features (as the papers do) and the CLIP metrics on CLIP features.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..utils import UserError, atomic_write_json
from .manifests import load_models

log = logging.getLogger("continual_bench")

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
JUDGE_FILE = "judge.json"


def fetch_model(name: str, resources: str | Path, *, offline: bool = False, base_url: str | None = None,
                models_file: str | Path | None = None, **kwargs) -> Path:
    """Fetch (or verify, offline) model ``name`` into ``<resources>/<name>/``; return that folder."""
    from .fetch import ChecksumLock, fetch_manifest, write_fetch_record

    models = load_models(models_file)
    if name not in models:
        raise UserError(f"unknown model {name!r}; models.yaml lists {', '.join(sorted(models))}")
    spec = models[name]
    out = Path(resources) / name
    lock = ChecksumLock(out / "checksums.lock.json")
    files = fetch_manifest(spec.as_manifest(), out, lock=lock, offline=offline, base_url=base_url, **kwargs)
    if spec.format == "open_clip_openai":
        (pt,) = files.values()
        convert_openai_clip(pt, out)
    record = out / "fetched.json"
    write_fetch_record(files, record, manifest=spec.as_manifest(), lock=lock)
    data = json.loads(record.read_text())
    data.update({"revision": spec.revision, "format": spec.format})
    atomic_write_json(record, data)
    return out


def _openai_model_cfg(sd: dict) -> dict:
    """open_clip's model config of an OpenAI CLIP ViT state dict (as build_model_from_openai_state_dict infers it)."""
    if "visual.proj" not in sd:
        raise UserError("not an OpenAI CLIP ViT checkpoint (no visual.proj); ResNet CLIPs are not supported here")
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(sd["text_projection"].shape[1]),
        "quick_gelu": True,  # OpenAI's models were trained with QuickGELU
        "vision_cfg": {"layers": len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
                       "width": int(width), "patch_size": int(patch), "image_size": int(patch * grid)},
        "text_cfg": {"context_length": int(sd["positional_embedding"].shape[0]),
                     "vocab_size": int(sd["token_embedding.weight"].shape[0]), "width": int(text_width),
                     "heads": int(text_width // 64),
                     "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})},
    }


def convert_openai_clip(checkpoint: str | Path, out: str | Path) -> Path:
    """OpenAI CLIP checkpoint (JIT archive or state dict) -> open_clip local-dir in ``out`` (fp32)."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out)
    try:
        model = open_clip.load_openai_model(str(checkpoint), precision="fp32", device="cpu")
    except (RuntimeError, KeyError, OSError, ValueError) as exc:
        raise UserError(f"{checkpoint}: not a loadable OpenAI CLIP checkpoint ({' '.join(str(exc).split())[:200]})") from None
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg = _openai_model_cfg(sd)
    check = open_clip.CLIP(**cfg)
    missing, unexpected = check.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{checkpoint}: converted weights do not fit the inferred config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out / "open_clip_model.safetensors.tmp"
    save_file(sd, str(tmp))
    os.replace(tmp, out / "open_clip_model.safetensors")
    preprocess = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    atomic_write_json(out / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": preprocess})
    return out


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.linking")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def build_paper_judge(clip_dir: str | Path, inception_dir: str | Path, out: str | Path) -> Path:
    """One judge folder: the open_clip local-dir (hard links) + Inception weights + ``judge.json``."""
    clip_dir, inception_dir, out = Path(clip_dir), Path(inception_dir), Path(out)
    need = [clip_dir / "open_clip_config.json", clip_dir / "open_clip_model.safetensors"]
    weights = sorted(inception_dir.glob("*inception*.pth"))
    for f in need:
        if not f.is_file():
            raise UserError(f"{f}: missing; fetch the CLIP judge first (continual-bench fetch-models --model clip_vit_b_32)")
    if not weights:
        raise UserError(f"{inception_dir}: no Inception weights (*inception*.pth); fetch them first "
                        "(continual-bench fetch-models --model inception_kid)")
    out.mkdir(parents=True, exist_ok=True)
    for f in need + [weights[0]]:
        _link(f, out / f.name)
    atomic_write_json(out / JUDGE_FILE, {"clip": ".", "kid_features": "inception",
                                         "inception_weights": weights[0].name,
                                         "note": "CLIP ViT-B/32 for clip/clip_t; torch-fidelity InceptionV3 "
                                                 "(2048-d pool features) for KID"})
    return out
