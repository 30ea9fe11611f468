"""lfs_diffusion: KD between student and teacher on the teacher's latent z*_t; ICGen's SDEdit start."""
import pytest
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method
from continual_bench.methods.t2i.lfs_diffusion import kd_loss, sdedit_start
from continual_bench.utils import UserError


def test_kd_loss_by_hand():
    student = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert torch.isclose(kd_loss(student, teacher), torch.tensor((1 + 4 + 0 + 4) / 4))


def test_sdedit_start_by_hand():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ctx, noise = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)
    ts, z = sdedit_start(sched, ctx, noise, 0.5, 10)  # strength 0.5: the last 5 of 10 timesteps
    assert len(ts) == 5 and int(ts[0]) == 499
    ab = float(sched.alphas_cumprod[499])
    assert torch.allclose(z, torch.full_like(z, 2.0 * ab ** 0.5 - (1 - ab) ** 0.5))
    ts, z = sdedit_start(sched, ctx, noise, 1.0, 10)
    assert len(ts) == 10 and torch.equal(z, noise)  # strength 1: plain generation


def _lfs(pipe, name="lfs_diffusion", **kw):
    cls = get_method("t2i", name)
    return cls(T2IModel.from_pretrained(pipe), build_settings(cls.Settings, {"rank": 2, **kw}, "t"), seed=0)


def test_teacher_trajectory_cache_and_zero_kd_at_start(tiny_pipeline):
    m = _lfs(tiny_pipeline, "lfs_diffusion_model_context", kd_timesteps=3, kd_n_traj=2, kd_batch=6, icgen_steps=2,
             icgen_n_context=2)
    t1 = Task(index=1, concept="a", token="<v1>", prompt="a photo of <v1>", images=torch.empty(0), class_word="person")
    m.begin_task(t1)
    c = m.cache  # 1 relevant prompt x 2 trajectories x 3 DDPM steps
    assert len(c["z"]) == 6 and c["emb"].shape[0] == 1 and sorted(set(c["t"].tolist()), reverse=True)[0] == 999
    # the target is the teacher's conditional output at the teacher's own latent z*_t
    m.model.unet.disable_adapters()  # the student without its new adapter is the model before the task
    with torch.no_grad():
        teacher = m.model.unet(c["z"], c["t"], c["emb"][c["prompt"]]).sample
    m.model.unet.enable_adapters()
    assert torch.allclose(teacher, c["target"], atol=1e-5)
    # the fresh adapter (B = 0) leaves the student equal to the teacher: L_KD = 0 before any step
    lat = torch.zeros(2, 4, 16, 16)
    out = m.loss({"latents": lat, "prompts": [t1.prompt] * 2, "generator": torch.Generator().manual_seed(0)})
    assert float(out["kd"]) < 1e-10
    m.end_task(t1)
    assert m.past[0]["icgen_context"].shape == (2, 4, 16, 16)
    # ICGen at strength 1 is plain generation; the generic prompt never uses a context
    kw = dict(seed=3, steps=2, guidance=5.0)
    plain = T2IModel.generate(m.model, [t1.prompt] * 2, **kw)
    m.settings.icgen_strength = 1.0
    assert abs(m.generate(t1, 2, **kw).astype(int) - plain.astype(int)).max() <= 1
    m.settings.icgen_strength = 0.5
    assert (m.generate(t1, 2, **kw) != plain).any()
    assert m.context_of("a photo of a person") is None
    assert (m.generate_prompt("a photo of a person", 2, **kw) == T2IModel.generate(m.model, ["a photo of a person"] * 2, **kw)).all()


READINGS = {  # name -> (kd_previous, icgen, icgen_context): the ablation's six cells
    "lfs_diffusion": (False, True, "image"),
    "lfs_diffusion_no_icgen": (False, False, "image"),
    "lfs_diffusion_model_context": (False, True, "model"),
    "lfs_diffusion_kd_previous": (True, True, "image"),
    "lfs_diffusion_kd_previous_no_icgen": (True, False, "image"),
    "lfs_diffusion_kd_previous_model_context": (True, True, "model"),
}


def test_readings_differ_only_in_kd_prompts_and_icgen():
    base = get_method("t2i", "lfs_diffusion")
    ref = vars(base.Settings())
    for name, (prev, icgen, ctx) in READINGS.items():
        cls = get_method("t2i", name)
        s = cls.Settings()
        assert issubclass(cls, base) and (s.kd_previous, s.icgen, s.icgen_context) == (prev, icgen, ctx), name
        assert s.kd_relevant
        same = {k: v for k, v in vars(s).items() if k not in ("kd_previous", "icgen", "icgen_context")}
        assert same == {k: v for k, v in ref.items() if k not in ("kd_previous", "icgen", "icgen_context")}, name
        assert cls.stores_user_data == (icgen and ctx == "image"), name  # listed by `continual-bench methods`
    assert get_method("t2i", "lfs_diffusion_no_icgen")(None, get_method("t2i", "lfs_diffusion_no_icgen").Settings()
                                                       ).context_of("a photo of <v1>") is None  # plain sampling


def test_kd_prompts_relevant_only_or_with_previous():
    past = [Task(index=i, concept=f"c{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>", images=torch.empty(0))
            for i in (1, 2)]
    t3 = Task(index=3, concept="c3", token="<v3>", prompt="a photo of <v3>", images=torch.empty(0),
              class_word="person", past=past)
    rel = get_method("t2i", "lfs_diffusion")
    prev = get_method("t2i", "lfs_diffusion_kd_previous")
    assert rel(None, rel.Settings()).kd_prompts(t3) == ["a photo of a person"]
    assert prev(None, prev.Settings()).kd_prompts(t3) == ["a photo of a person", "a photo of <v1>", "a photo of <v2>"]


def test_image_context_is_the_training_images_vae_means(tiny_pipeline):
    m = _lfs(tiny_pipeline, kd_weight=0.0, icgen_n_context=2)
    imgs = torch.rand(3, 3, m.model.image_size, m.model.image_size, generator=torch.Generator().manual_seed(1))
    t1 = Task(index=1, concept="a", token="<v1>", prompt="a photo of <v1>", images=imgs, class_word="person")
    m.begin_task(t1)
    m.end_task(t1)
    ctx = m.past[0]["icgen_context"]
    with torch.no_grad():
        mean, _ = m.model.latent_dist(imgs)
    scaled = mean * m.model.vae.config.scaling_factor
    # each stored context is one training image's posterior mean, scaled as the UNet's latents (by hand)
    assert ctx.shape[0] == 2
    assert all(any(torch.allclose(c, s, atol=1e-6) for s in scaled) for c in ctx)
    assert m.n_stored() >= ctx.numel()  # counted in N_store
    bad = get_method("t2i", "lfs_diffusion")
    with pytest.raises(UserError, match="icgen_context"):
        bad(None, build_settings(bad.Settings, {"icgen_context": "images"}, "t"))
