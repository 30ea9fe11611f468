"""lfs_diffusion: KD between student and teacher on the teacher's latent z*_t; ICGen's SDEdit start."""
import torch

from continual_bench.backbones.model import T2IModel
from continual_bench.methods.base import Task, build_settings
from continual_bench.methods.registry import get_method
from continual_bench.methods.t2i.lfs_diffusion import kd_loss, sdedit_start


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
    m = _lfs(tiny_pipeline, kd_timesteps=3, kd_n_traj=2, kd_batch=6, icgen_steps=2, icgen_n_context=2)
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


def test_no_icgen_variant_differs_only_in_icgen():
    a, b = get_method("t2i", "lfs_diffusion"), get_method("t2i", "lfs_diffusion_no_icgen")
    sa, sb = a.Settings(), b.Settings()
    assert sa.icgen and not sb.icgen and issubclass(b, a)
    assert b(None, sb).context_of("a photo of <v1>") is None  # plain sampling for every prompt
    assert {k: v for k, v in vars(sa).items() if k != "icgen"} == {k: v for k, v in vars(sb).items() if k != "icgen"}
