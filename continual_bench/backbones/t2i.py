"""Text-to-image backbones: Stable Diffusion v1.x (paper profile) or the tiny toy pipeline, one code path.

Both are directories written by ``StableDiffusionPipeline.save_pretrained`` and read back with
``from_pretrained`` (subfolders ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``).
The toy pipeline is built from the same diffusers/transformers classes with tiny configurations;
its tokenizer is OpenAI CLIP's BPE, converted offline from the vocabulary open_clip ships.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils import UserError


# ------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (the one every CLIP BPE vocabulary is written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of OpenAI CLIP's BPE from open_clip's bundled vocabulary.

    The construction mirrors ``open_clip.tokenizer.SimpleTokenizer`` (256 byte tokens, the same with
    ``</w>``, 48,894 merges, then start/end of text: 49,408 ids), so ids equal OpenAI CLIP's.
    transformers cannot read the gzipped BPE file directly, hence this conversion. The toy world uses
    ``model_max_length=32`` (its captions are shorter; cross-attention cost scales with it).
    """
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------- toy configs
@dataclass
class ToyT2IConfig:
    """Sizes of the toy pipeline: 32x32 pixels, 8x8x8 latents (config ``toy.latent_size``: 8 or 16).

    Stable Diffusion's VAE downsamples 8x (512 -> 64); the toy's 4x (32 -> 8), with three encoder levels and
    8 latent channels (with 4, the oracle recognised 88 % of VAE-reconstructed landmark images; with 8, 93 %;
    faces 100 % either way). The UNet has transformer blocks on its 4x4 and 2x2 levels only.
    The earlier world (``latent_size: 16``: two VAE levels, 4 channels, attention on 8x8 and 4x4) cost
    2-3x more per UNet call on a CPU and put the default DAG at 18-19 min on 2 cores (measured on one core:
    a 64-image sampling step 0.49 s vs 0.17 s with 8x8 latents; with attention on the 8x8 level too, 8x8
    latents saved only 15-25 %). Caption binding of the base model (oracle, 8 samples per concept
    caption, guidance 1.5): faces 0.87 -> 0.81, landmarks 0.48 -> 0.36.
    """

    image_size: int = 32
    latent_channels: int = 8
    vae_channels: tuple[int, ...] = (16, 32, 64)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    attention_max_resolution: int = 4  # transformer blocks (self + cross-attention) on levels of <= 4x4 latents
    attention_head_dim: int = 32

    @classmethod
    def for_latent_size(cls, latent_size: int) -> "ToyT2IConfig":
        """The two worlds: 8 (default) or 16 (the earlier one, kept to reproduce old results)."""
        if latent_size == 8:
            return cls()
        if latent_size == 16:
            return cls(vae_channels=(16, 32), latent_channels=4, attention_max_resolution=8)
        raise UserError(f"toy.latent_size {latent_size}: must be 8 or 16 (32x32 images)")


def build_toy_vae(cfg: ToyT2IConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=8,
        sample_size=cfg.image_size, mid_block_add_attention=False,
    )


def build_toy_text_encoder(cfg: ToyT2IConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    tc = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, max_position_embeddings=77,
        projection_dim=cfg.text_width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(tc)


def build_toy_unet(cfg: ToyT2IConfig, latent_size: int):
    """Transformer blocks (self- and cross-attention) only on levels whose latents are at most
    ``cfg.attention_max_resolution`` wide.

    Attention is the CPU's bottleneck (its many small ops more than its FLOPs): over 256 tokens (16x16) it
    made the UNet 5x slower, and on the 8x8 level of 8x8 latents it doubled a training step. In the earlier
    16x16-latent world, dropping the 8x8 level's attention blurred the samples (oracle 59 % on the base
    model's concept captions, 100 % with it); with 8x8 latents, attention on 4x4 and 2x2 binds captions
    (see ``ToyT2IConfig``).
    """
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    res = [latent_size // 2 ** i for i in range(n)]
    attn = [r <= cfg.attention_max_resolution for r in res]
    if not any(attn):
        raise UserError(f"toy UNet: no level of {latent_size}x{latent_size} latents is <= "
                        f"{cfg.attention_max_resolution} wide, so no cross-attention would see the text")
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        layers_per_block=1, block_out_channels=cfg.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.attention_head_dim, norm_num_groups=32,
    )


def training_scheduler():
    """The toy backbone's noise schedule: Stable Diffusion v1's betas, rescaled to zero terminal SNR, v-prediction.

    SD v1's schedule leaves signal at t = 1000 (SNR 2e-5 per pixel, but the mean colour of a large region
    survives), so a model trained on it reads large-region colours from the noisy latent instead of the
    prompt, and at sampling time those colours come from the random initial noise. The toy world's
    concepts differ exactly in such colours (shirt, sky): with SD v1's schedule the tiny model bound them
    to text poorly and customization could not learn them. Lin et al., "Common Diffusion Noise Schedules
    and Sample Steps are Flawed" (WACV 2024) fix it with zero terminal SNR (sec. 3.1), v-prediction
    (3.2) and trailing timesteps (3.3); Stable Diffusion 2.x is v-prediction too. Everything downstream
    reads ``prediction_type`` from the saved scheduler config, so SD v1.x (epsilon) runs the same code.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                         timestep_spacing="trailing")


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts under ``scheduler.config.prediction_type`` (epsilon: SD v1.x; v: SD 2.x, toy)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise UserError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


# ------------------------------------------------------------------------------------------- loading
def load_pipeline(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a saved pipeline (toy or Stable Diffusion) from a local directory, offline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path}: not a diffusers pipeline directory (no model_index.json); "
                        "run the backbone rule first (snakemake resources/...)")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False,
                                                   dtype=dtype, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_pipeline(vae, text_encoder, tokenizer, unet, out_dir: str | Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=training_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
