import numpy as np
import open_clip
import pytest
import torch

from continual_bench.backbones import t2i
from continual_bench.backbones.model import T2IModel
from continual_bench.utils import UserError


@pytest.mark.parametrize("text", ["a photo of a person with long blonde hair, tan skin and a red shirt",
                                  "a photo of a waterfall with two wide falls!", "Ünïcode and  spaces"])
def test_tokenizer_ids_equal_openai_clip(tokenizer_dir, text):
    ours = t2i.load_tokenizer(tokenizer_dir)
    ref = open_clip.SimpleTokenizer()(text)[0].tolist()
    ids = ours(text).input_ids
    assert len(ours) == 49408
    assert ids == ref[: len(ids)] and ref[len(ids)] == 0
    assert ours.model_max_length == 16


def test_pipeline_round_trip(tiny_pipeline):
    m1 = T2IModel.from_pretrained(tiny_pipeline)
    m2 = T2IModel.from_pretrained(tiny_pipeline)
    assert type(m1.pipe).__name__ == "StableDiffusionPipeline"
    assert m1.image_size == 32
    a = m1.generate(["a photo of a person"] * 2, seed=1, steps=2)
    b = m2.generate(["a photo of a person"] * 2, seed=1, steps=2)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    for p1, p2 in zip(m1.unet.parameters(), m2.unet.parameters()):
        assert torch.equal(p1, p2)


def test_missing_pipeline_is_clear(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        T2IModel.from_pretrained(tmp_path)


def test_add_concept_token(tiny_pipeline):
    m = T2IModel.from_pretrained(tiny_pipeline)
    n = len(m.tokenizer)
    tid = m.add_concept_token("<v1>", generator=torch.Generator().manual_seed(0))
    assert tid == n and m.token_embeddings().shape[0] == n + 1
    assert m.tokenize(["a photo of <v1>"])[0].tolist().count(tid) == 1  # one token, not split by BPE
    emb = m.token_embeddings()
    assert 0.2 < emb[tid].std().item() / emb[:-1].std().item() < 5  # random init at the table's scale
    with pytest.raises(ValueError):
        m.add_concept_token("<v1>")


def test_toy_schedule_zero_terminal_snr_and_v_target():
    """Lin et al. 2024: the last timestep is pure noise, and the UNet predicts v = sqrt(a) eps - sqrt(1-a) x0."""
    import pytest
    import torch
    from diffusers import DDPMScheduler

    from continual_bench.backbones.t2i import diffusion_target, training_scheduler
    from continual_bench.utils import UserError

    sched = training_scheduler()
    a = sched.alphas_cumprod
    assert float(a[-1]) < 1e-6 and float(a[0]) > 0.99  # SD v1's schedule leaves a[-1] = 0.0047
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    t = torch.tensor([500])
    want = a[500].sqrt() * -1.0 - (1 - a[500]).sqrt() * 2.0
    assert float(diffusion_target(sched, x0, eps, t)) == pytest.approx(float(want), rel=1e-5)
    eps_sched = DDPMScheduler(prediction_type="epsilon")  # SD v1.x: the target is the noise itself
    assert torch.equal(diffusion_target(eps_sched, x0, eps, t), eps)
    with pytest.raises(UserError, match="sample"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), x0, eps, t)


@pytest.mark.parametrize("latent_size, vae_levels, channels, attn_levels",
                         [(8, 3, 8, ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
                          (16, 2, 4, ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])])
def test_toy_worlds_latent_shape_and_attention_levels(latent_size, vae_levels, channels, attn_levels):
    """toy.latent_size 8 (default): 32x32 -> 8x8x8, attention on the 4x4 and 2x2 UNet levels; 16: the earlier
    world (16x16x4, attention on 8x8 and 4x4). Either way the highest-resolution level has none."""
    cfg = t2i.ToyT2IConfig.for_latent_size(latent_size)
    vae = t2i.build_toy_vae(cfg)
    assert len(vae.config.block_out_channels) == vae_levels
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert tuple(lat.shape) == (1, channels, latent_size, latent_size)
    unet = t2i.build_toy_unet(cfg, latent_size)
    assert list(unet.config.down_block_types) == attn_levels
    assert list(unet.config.up_block_types) == [b.replace("Down", "Up") for b in reversed(attn_levels)]
    assert unet(lat, torch.tensor([10]), torch.zeros(1, 4, cfg.text_width)).sample.shape == lat.shape


def test_toy_unet_refuses_a_config_without_cross_attention():
    cfg = t2i.ToyT2IConfig(unet_channels=(32, 64), attention_max_resolution=2)
    with pytest.raises(UserError, match="no level of 16x16"):
        t2i.build_toy_unet(cfg, 16)
    with pytest.raises(UserError, match="latent_size 12"):
        t2i.ToyT2IConfig.for_latent_size(12)
