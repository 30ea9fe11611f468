"""LFS-Diffusion: data-free knowledge distillation on the teacher's trajectory, plus In-Context Generation.

Paper: Song, Yang, Yang, Lin, "Towards Lifelong Few-Shot Customization of Text-to-Image Diffusion"
(LFS-Diffusion; seed ``002`` of this project, REFERENCE.md sec. 1). Two kinds of forgetting: relevant
concepts ("cat" collapses onto "V1 cat") and previous concepts (earlier V_i are lost).

The paper's two components, and the readings registered here (the names are the ablation's cells):

    KD on                      | ICGen: none                         | model context                    | image context
    relevant concept only      | lfs_diffusion_no_icgen              | lfs_diffusion_model_context      | lfs_diffusion
    relevant + previous        | lfs_diffusion_kd_previous_no_icgen  | lfs_diffusion_kd_previous_model_context | lfs_diffusion_kd_previous

Which reading the plain name ``lfs_diffusion`` is, and why. The abstract assigns each component to one kind
of forgetting: "we first devise a data-free knowledge distillation strategy to tackle relevant concepts
forgetting", and ICGen "facilitates the few-shot generation and mitigates the issue of previous concepts
forgetting". The same abstract also says the distillation is "on-the-fly knowledge distillation to retain the
previous concepts while learning new ones". Fig. 4 illustrates the distillation on the relevant concept only
("cat" while learning "V1 cat"), and if KD already covered the previous concepts, ICGen's stated role would be
redundant; so we read "the previous concepts" of that sentence as the knowledge the model had before the
session (the relevant ones), and the plain name distils on the relevant concept only. The reading that also
distils on every previous concept's prompt (what this suite called ``lfs_diffusion`` before 2026-12-01) is
``lfs_diffusion_kd_previous*``. Fig. 3 says the vision context Z_0^{S^i} "is also sampled" in the session's
training stage, and ICGen "facilitates the few-shot generation": Z_0 is the diffusion notation of a clean
(data) latent, and the stage that has the session's few-shot images is the one it comes from; so the plain
name takes the context from the session's training images (their VAE latents, stored: this reading keeps
user data, counted in N_store and marked in ``continual-bench methods``). The model-context reading (the
context sampled by the just-trained model, no user data kept) is ``*_model_context``. The ablation in
``results/toy_full`` (README) measures which component does the work.

1. Data-free knowledge distillation (paper's L_KD, Fig. 4 and 5). The teacher f* is the model before the
   session. A DDPM scheduler with ``kd_timesteps`` = 25 steps runs the teacher's reverse trajectory
   z*_T -> ... -> z*_0 for prompts of the relevant concept (the class prompt "a photo of a person") and,
   with ``kd_previous``, of every previous concept; at each timestep t the SAME teacher latent z*_t is fed to
   teacher and student and their model outputs are matched:

       L = L_diffusion(D_i)  +  kd_weight * E_{p, t} || f_theta(z*_t, t, c_p) - f*(z*_t, t, c_p) ||^2 .

   No stored image is used. The student never follows its own trajectory (the paper's Fig. 5: that
   accumulates artifacts).
   Implementation: the trajectories are run once per task, in ``begin_task``, before the new adapter is
   added, so the model at that moment IS the teacher (the folded weights after session i-1); for every
   visited (z*_t, t, p) the teacher's conditional output f*(z*_t, t, c_p) is cached with it. The teacher is
   therefore never copied nor reloaded, and a training step costs one extra student forward on ``kd_batch``
   cached samples. The trajectory itself uses classifier-free guidance ``kd_guidance`` (as sampling does);
   the distillation target is the teacher's conditional output, what the student is trained to predict.
   "Noise prediction" in the paper is the model output: epsilon for SD v1.x, the velocity v for the toy
   backbone (v-prediction; matching v or epsilon differs only by a per-timestep factor).

2. In-Context Generation (ICGen). The paper samples a vision context Z_0^{S_i} per session and conditions
   generation on it at inference, without extra training; its exact mechanism has not been read here
   (REFERENCE.md). This file's interpretation, stated: at the end of session i, ``icgen_n_context`` clean
   latents Z_0 of concept i are stored: ``icgen_context: image`` takes the VAE posterior means of that many of
   the session's training images (a seeded choice), ``icgen_context: model`` samples them with the
   just-trained model and the concept's prompt. At inference for concept i's prompt, sample j starts from its
   context Z_0^{(j mod n)} noised to strength s (SDEdit: z_start = sqrt(alpha_bar_{t_s}) Z_0 +
   sqrt(1 - alpha_bar_{t_s}) eps, t_s the first of the last round(s * steps) DDIM timesteps) and is denoised
   with the current model and the concept's prompt. The context carries what concept i looked like in its
   session into later sessions (against previous-concept forgetting); s = 1 is plain generation. Prompts
   without a concept token (the generic prompt) are generated plainly. ``icgen: false`` turns ICGen off.

Adapter: the student is ``lora_sequential``'s (this class subclasses it): a fresh LoRA on the
cross-attention K/V per session, folded afterwards, a new random token row. The paper builds on an
existing customization method; which adapter it uses has not been read here. Sharing lora_sequential's
makes the comparison with ``lora_sequential``, ``c_lora`` and ``generative_replay`` differ only in the
forgetting counter-measure: same trainable parameters, learning rates, steps.
Paper-profile values of kd_weight, the number of trajectories and ICGen's strength are not known here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...utils import UserError, stable_seed
from ..base import Task, setting
from ..registry import register
from .lora_sequential import LoRASequential, LoRASettings


@dataclass
class LFSSettings(LoRASettings):
    kd_weight: float = setting(1.0, "weight of L_KD (paper profile: not known here)", min=0)
    kd_timesteps: int = setting(25, "DDPM steps of the teacher trajectory (paper: 25)", min=1)
    kd_n_traj: int = setting(4, "teacher trajectories per distillation prompt, cached at begin_task", min=1)
    kd_batch: int = setting(4, "cached (z*_t, t, prompt) samples per training step (one extra student forward)", min=1)
    kd_guidance: float = setting(5.0, "classifier-free guidance of the teacher trajectory (as evaluation sampling)",
                                 min=0)
    kd_relevant: bool = setting(True, "distil on the relevant concept's prompt ('a photo of a person')")
    kd_previous: bool = setting(False, "also distil on every previous concept's prompt (the *_kd_previous readings)")
    icgen: bool = setting(True, "In-Context Generation at inference")
    icgen_context: str = setting("image", "Z_0 from the session's training images ('image') or sampled by the model "
                                 "('model')", choices=("image", "model"))
    icgen_strength: float = setting(0.8, "SDEdit strength s from the stored context (1 = plain generation)", gt=0, max=1)
    icgen_n_context: int = setting(4, "context latents stored per session", min=1)
    icgen_steps: int = setting(15, "DDIM steps to sample the contexts (toy evaluation's)", min=1)


# ------------------------------------------------------------------------------------------- sampling helpers
def _uncond(model, n: int) -> torch.Tensor:
    return model.encode_text([""]).expand(n, -1, -1)


@torch.no_grad()
def teacher_trajectories(model, prompts: list[str], n_traj: int, timesteps: int, guidance: float, seed: int,
                         batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The teacher's DDPM reverse trajectories, with every visited z*_t and its conditional output f*(z*_t, t, c).

    Returns ``z`` (N, C, h, w), ``t`` (N,), ``prompt`` (N,) indices into ``prompts``, ``target`` (N, C, h, w)
    and ``emb`` (P, L, d), all on the model's device: N = len(prompts) x n_traj x timesteps.
    """
    from diffusers import DDPMScheduler

    unet = model.unet
    emb = model.encode_text(prompts)
    which = torch.arange(len(prompts)).repeat_interleave(n_traj)
    g = torch.Generator().manual_seed(seed)
    zs, ts, ps, targets = [], [], [], []
    for i in range(0, len(which), batch_size):
        w = which[i:i + batch_size]
        sched = DDPMScheduler.from_config(model.noise_scheduler.config)
        sched.set_timesteps(timesteps)
        shape = (len(w), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        z = torch.randn(shape, generator=g).to(model.device, unet.dtype)
        cond, unc = emb[w.to(emb.device)], _uncond(model, len(w))
        for t in sched.timesteps:
            tt = torch.full((len(w),), int(t), device=model.device, dtype=torch.long)
            out = unet(torch.cat([z, z]), tt.repeat(2), torch.cat([unc, cond])).sample
            o_unc, o_cond = out.chunk(2)
            zs.append(z.clone())
            ts.append(tt.clone())
            ps.append(w.to(model.device))
            targets.append(o_cond.clone())
            guided = o_unc + guidance * (o_cond - o_unc) if guidance > 1 else o_cond
            z = sched.step(guided, t, z, generator=g).prev_sample
    return {"z": torch.cat(zs), "t": torch.cat(ts), "prompt": torch.cat(ps), "target": torch.cat(targets), "emb": emb}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """|| f_theta(z*_t, t, c) - f*(z*_t, t, c) ||^2, averaged over elements (the diffusion loss's scale)."""
    return F.mse_loss(student.float(), teacher.float())


def sdedit_start(scheduler, context: torch.Tensor, noise: torch.Tensor, strength: float, steps: int):
    """ICGen's start: (timesteps to run, initial latent). Strength s keeps the last round(s * steps) DDIM
    timesteps and noises the context to the first of them; s >= 1 starts from the noise itself."""
    scheduler.set_timesteps(steps)
    n = min(max(int(round(strength * steps)), 1), steps)
    timesteps = scheduler.timesteps[steps - n:]
    if n == steps and strength >= 1:
        return timesteps, noise
    return timesteps, scheduler.add_noise(context, noise, timesteps[:1].repeat(len(noise)))


@torch.no_grad()
def ddim_sample(model, prompts: list[str], latents: torch.Tensor, timesteps, scheduler,
                guidance: float) -> torch.Tensor:
    """The pipeline's denoising loop (classifier-free guidance with the empty prompt, DDIM) from ``latents``."""
    cond, unc = model.encode_text(prompts), _uncond(model, len(prompts))
    z = latents
    for t in timesteps:
        if guidance > 1:
            o_unc, o_cond = model.unet(torch.cat([z, z]), t, torch.cat([unc, cond])).sample.chunk(2)
            out = o_unc + guidance * (o_cond - o_unc)
        else:
            out = model.unet(z, t, cond).sample
        z = scheduler.step(out, t, z).prev_sample
    return z


@torch.no_grad()
def decode(model, latents: torch.Tensor) -> np.ndarray:
    img = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    arr = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------- the method
@register("t2i", "lfs_diffusion")
class LFSDiffusion(LoRASequential):
    """LFS-Diffusion (Song et al.): data-free KD on the teacher's 25-step DDPM trajectory + In-Context Generation.

    L = L_diff + kd_weight * ||f_theta(z*_t, t, c_p) - f*(z*_t, t, c_p)||^2, z*_t from the teacher (relevant and
    previous concepts' prompts); ICGen: SDEdit from a stored context latent of the concept (interpretation).
    """

    paper = "Song et al., Towards Lifelong Few-Shot Customization of Text-to-Image Diffusion (LFS-Diffusion)"
    Settings = LFSSettings
    stores_user_data = True  # the image-context ICGen keeps latents of the training images

    def kd_prompts(self, task: Task) -> list[str]:
        s = self.settings
        relevant = [task.generic_prompt] if s.kd_relevant else []
        previous = [self.prompt(p) for p in task.past] if s.kd_previous else []
        return relevant + previous

    def begin_task(self, task: Task) -> None:
        s = self.settings
        prompts = self.kd_prompts(task)
        self.cache = None
        if prompts and s.kd_weight:  # the model is still the teacher: no new token, no new adapter yet
            self.cache = teacher_trajectories(self.model, prompts, s.kd_n_traj, s.kd_timesteps, s.kd_guidance,
                                              seed=stable_seed("lfs-teacher", self.seed, task.index))
        super().begin_task(task)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().loss(batch)
        if self.cache is None:
            return out
        c = self.cache
        idx = torch.randint(0, len(c["z"]), (self.settings.kd_batch,), generator=batch["generator"]).to(c["z"].device)
        student = self.model.unet(c["z"][idx], c["t"][idx], c["emb"][c["prompt"][idx]]).sample  # the teacher's z*_t
        kd = kd_loss(student, c["target"][idx])
        out["kd"] = kd.detach()
        out["loss"] = out["loss"] + self.settings.kd_weight * kd
        return out

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        if settings.icgen_context not in ICGEN_CONTEXTS:
            raise UserError(f"method_settings.{self.name}.icgen_context: expected one of {list(ICGEN_CONTEXTS)}, "
                            f"got {settings.icgen_context!r}")

    def end_task(self, task: Task) -> None:
        self.cache = None
        super().end_task(task)
        if self.settings.icgen:  # the session's vision context Z_0, stored with the session's adapter
            ctx = self.image_context(task) if self.settings.icgen_context == "image" else self.model_context(task)
            self.past[-1]["icgen_context"] = ctx.detach().float().cpu().contiguous()

    def image_context(self, task: Task) -> torch.Tensor:
        """Z_0 from the session's own training images: VAE posterior means (scaled as the UNet's latents) of
        ``icgen_n_context`` of them, a seeded choice. This reading stores user data (counted in N_store)."""
        n = min(self.settings.icgen_n_context, len(task.images))
        if n < 1:
            raise UserError(f"{self.name}: task {task.index} has no training images for the ICGen context")
        g = torch.Generator().manual_seed(stable_seed("icgen-context", self.seed, task.index))
        pick = torch.randperm(len(task.images), generator=g)[:n].sort().values
        with torch.no_grad():
            mean, _ = self.model.latent_dist(task.images[pick])
        return mean * self.model.vae.config.scaling_factor

    def model_context(self, task: Task) -> torch.Tensor:
        """Z_0 sampled by the just-trained model for the concept's prompt (no user data kept)."""
        s = self.settings
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.model.pipe.scheduler.config)
        sched.set_timesteps(s.icgen_steps)
        unet = self.model.unet
        shape = (s.icgen_n_context, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        g = torch.Generator().manual_seed(stable_seed("icgen-context", self.seed, task.index))
        noise = torch.randn(shape, generator=g).to(self.model.device, unet.dtype)
        prompts = [self.prompt(task)] * len(noise)
        return ddim_sample(self.model, prompts, noise, sched.timesteps, sched, s.kd_guidance)

    # ------------------------------------------------------------------ inference
    def context_of(self, prompt: str) -> torch.Tensor | None:
        """The stored context of the (first) concept whose token is in ``prompt``; None without ICGen."""
        if not self.settings.icgen:
            return None
        for tok, entry in zip(self.model.concept_tokens, self.past):
            if tok in prompt and "icgen_context" in entry:
                return entry["icgen_context"]
        return None

    def generate_prompt(self, prompt: str, n: int, *, seed: int, steps: int = 25, guidance: float = 5.0,
                        batch_size: int = 64, **sample_kw) -> np.ndarray:
        ctx = self.context_of(prompt)
        if ctx is None or sample_kw.get("negative_prompt") or sample_kw.get("guidance_rescale"):
            return super().generate_prompt(prompt, n, seed=seed, steps=steps, guidance=guidance,
                                           batch_size=batch_size, **sample_kw)
        from diffusers import DDIMScheduler

        unet = self.model.unet
        g = torch.Generator().manual_seed(seed)  # the same initial noise as plain generation (T2IModel.generate)
        out = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            shape = (m, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            noise = torch.randn(shape, generator=g).to(self.model.device, unet.dtype)
            context = ctx[torch.arange(i, i + m) % len(ctx)].to(noise)
            sched = DDIMScheduler.from_config(self.model.pipe.scheduler.config)
            timesteps, z = sdedit_start(sched, context, noise, self.settings.icgen_strength, steps)
            out.append(decode(self.model, ddim_sample(self.model, [prompt] * m, z, timesteps, sched, guidance)))
        return np.concatenate(out)


# ------------------------------------------------------------------------------------------- the other readings
ICGEN_CONTEXTS = ("image", "model")
_PAPER = "Song et al., Towards Lifelong Few-Shot Customization of Text-to-Image Diffusion (LFS-Diffusion)"


def _reading(name: str, what: str, **defaults) -> type:
    """Register one reading of LFS-Diffusion: the same class with other Settings defaults (the module docstring's
    table). A subclass per name, so ``continual-bench methods`` lists each with its own settings."""
    base = {f.name: f for f in dataclasses.fields(LFSSettings)}
    fields = [(k, type(v), dataclasses.field(default=v, metadata=base[k].metadata)) for k, v in defaults.items()]
    settings = dataclasses.make_dataclass(f"Settings_{name}", fields, bases=(LFSSettings,))
    doc = (f"LFS-Diffusion, reading {what} (Song et al.; see lfs_diffusion's docstring).\n\n"
           "L = L_diff + kd_weight * ||f_theta(z*_t, t, c_p) - f*(z*_t, t, c_p)||^2 over the teacher's trajectory.")
    keeps = bool(settings.icgen and settings.icgen_context == "image")
    cls = type(f"LFS_{name}", (LFSDiffusion,), {"__doc__": doc, "paper": f"{_PAPER} - {what}", "Settings": settings,
                                                "__module__": __name__, "stores_user_data": keeps})
    return register("t2i", name)(cls)


LFSDiffusionNoICGen = _reading("lfs_diffusion_no_icgen", "KD on the relevant concept, no ICGen", icgen=False)
LFSDiffusionModelContext = _reading("lfs_diffusion_model_context", "KD on the relevant concept, ICGen from a "
                                    "model-sampled context", icgen_context="model")
LFSDiffusionKDPrevious = _reading("lfs_diffusion_kd_previous", "KD on the relevant and every previous concept, "
                                  "ICGen from the training images", kd_previous=True)
LFSDiffusionKDPreviousNoICGen = _reading("lfs_diffusion_kd_previous_no_icgen", "KD on the relevant and every "
                                         "previous concept, no ICGen", kd_previous=True, icgen=False)
LFSDiffusionKDPreviousModelContext = _reading(
    "lfs_diffusion_kd_previous_model_context", "KD on the relevant and every previous concept, ICGen from a "
    "model-sampled context (the suite's lfs_diffusion before 2026-12-01)", kd_previous=True, icgen_context="model")
