"""``continual-bench bench``: our training and sampling paths timed beside the field's reference recipes.

Every comparison runs the same architecture with random weights (nothing is downloaded), once our way and once
the reference way, each in a fresh process (so each has its own peak memory and nothing warms the other's caches):

* ``t2i_train``: one C-LoRA training step through the engine (:func:`continual_bench.engine.t2i.train_one_task`:
  VAE latents cached once per task, bf16 autocast on a GPU) against the recipe of diffusers' examples
  (``train_text_to_image_lora.py``'s step, with the concept token trained as ``train_custom_diffusion.py`` trains its
  modifier token, since C-LoRA trains one too): fp32, the VAE encoding the images and the text encoder the prompts
  at every step, peft LoRA (rank as ours) on the UNet's attention projections, AdamW, gradient clipping at 1.
* ``t2i_sample``: images/s of our generation path (:meth:`T2IModel.generate`, prompts batched, latents drawn up
  front) against ``StableDiffusionPipeline.__call__`` with its defaults, one prompt per call, at the same steps
  and guidance.
* ``cls_train`` / ``cls_eval``: CODA-Prompt on a ViT through the engine's :class:`~continual_bench.engine.runner.
  TaskLoop` (our precision setting; under the toy profile's flip augmentation the frozen query is precomputed once
  per task, as the engine does) against CODA-P's form: fp32, a no-grad query pass then the prompted pass, for
  every batch; at evaluation ours reads the test queries computed once per run.

Per method (``t2i_method``, ``bench --methods``; ours only, there is no reference recipe to compare with): each
text-to-image method of the run configuration trains ``method_tasks`` tasks through the engine's
:func:`~continual_bench.engine.t2i.train_one_task` with its configured settings, ``steps`` timed steps per task.
Measured: its training step rate (its own loss: full-UNet gradients, penalties, distillation passes), the bytes
of the state the engine keeps after every task (``method.state_dict()``, what ``state.safetensors`` holds) and
its peak memory. The work a task does outside its steps is counted, not timed at the bench's reduced size: every
UNet evaluation outside a step (per image; a classifier-free-guidance batch counts both halves) is counted, the
no-grad ones (sampling: class images, replayed images, teacher trajectories) are answered with zeros instead of
run, and the ones with gradients (EWC's Fisher) run. :func:`method_cost_table` prices them at the measured
sampling and training rates. A method with a ``ridge`` setting at 0 gets 1e-6 (Custom Diffusion's closed-form merge:
random weights give a degenerate text space, and the solve costs the same either way).

Architectures: ``sd15`` (Stable Diffusion v1.x's UNet, VAE and CLIP ViT-L/14 text encoder built from their
configs), ``vitb16`` (timm ``vit_base_patch16_224``), and ``toy`` (the toy world's sizes, :class:`ToyT2IConfig`
and the toy ViT). On a GPU the paper's sizes run (512 px, 224 px); on a CPU the text-to-image resolution is
reduced (``--resolution``, recorded in every row) and sampling runs fewer steps (``--sample-steps``): rates are
per step or per image at the stated size, and the ratio ours / reference is what compares.

Measured: rate (steps/s or images/s, the median of per-step times after warm-up steps), peak memory (CUDA:
``max_memory_allocated``; CPU: the process's peak resident set, libraries included), model FLOPs per item
(``torch.utils.flop_counter``, forward + backward for training) and, on GPUs with a known peak, model FLOPs
utilisation. ``results/bench/<host>.csv`` holds one row per case and way; :func:`cost_table` turns the rows
and a run configuration into hours per run (the README's cost table).
"""
from __future__ import annotations

import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .utils import UserError, atomic_path, git_commit, package_versions, set_threads

# dense peak TFLOP/s per dtype (vendor data sheets; fp32 without TF32). Unknown devices: no MFU.
PEAK_TFLOPS = {"H200": {"bf16": 989.5, "fp32": 66.9}, "H100": {"bf16": 989.5, "fp32": 66.9},
               "A100": {"bf16": 312.0, "fp32": 19.5}, "L40S": {"bf16": 362.1, "fp32": 91.6},
               "A10": {"bf16": 125.0, "fp32": 31.2}}
CASES = ("t2i_train", "t2i_sample", "cls_train", "cls_eval")
WAYS = ("ours", "reference")


@dataclass
class BenchOptions:
    device: str = "auto"
    t2i_arch: str = "sd15"
    cls_arch: str = "vitb16"
    resolution: int = 0       # t2i pixels; 0 = 512 on a GPU, 64 on a CPU (sd15), 32 (toy)
    batch: int = 2            # t2i training batch (the paper profile's)
    rank: int = 16            # LoRA rank (the paper profile's)
    steps: int = 4            # timed training steps (after ``warmup``)
    warmup: int = 1
    n_images: int = 4         # images generated per way
    sample_steps: int = 0     # 0 = 200 on a GPU (the paper profile's evaluation), 2 on a CPU
    guidance: float = 6.0
    cls_batch: int = 0        # 0 = 128 on a GPU (CODA-P's), 4 on a CPU
    cls_steps: int = 3
    method: str = ""          # t2i_method: the method (its settings below; steps are the bench's)
    method_settings: dict = field(default_factory=dict)
    method_tasks: int = 3     # t2i_method: tasks trained (what a task does beyond its steps may depend on t)
    threads: int = 0          # torch CPU threads every case runs with; 0 = this process's (``--threads``)

    def resolved(self) -> "BenchOptions":
        """The options with the device and every 0 (= "the device's default") filled in."""
        from .engine.runner import resolve_device

        device = resolve_device(self.device)
        gpu = device.startswith("cuda")
        return replace(self, device=device,
                       resolution=self.resolution or (32 if self.t2i_arch == "toy" else 512 if gpu else 64),
                       sample_steps=self.sample_steps or (200 if gpu else 2),
                       cls_batch=self.cls_batch or (128 if gpu else 4),
                       threads=self.threads or torch.get_num_threads())


# ------------------------------------------------------------------------------------------- models
def _clip_tokenizer(max_length: int):
    """OpenAI CLIP's tokenizer (:func:`write_clip_tokenizer`), written to a temporary folder and loaded from it."""
    from .backbones.t2i import load_tokenizer, write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        return load_tokenizer(write_clip_tokenizer(tmp, max_length))


def sd15_pipeline(resolution: int):
    """Stable Diffusion v1.x's architecture with random weights: UNet, VAE and text encoder from their configs."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if resolution % 64:
        raise UserError(f"bench --resolution {resolution}: Stable Diffusion's UNet needs a multiple of 64")
    tok = _clip_tokenizer(77)
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=resolution)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
                                        hidden_act="quick_gelu"))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          num_train_timesteps=1000)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def toy_pipeline(resolution: int):
    """The toy world's architecture (:class:`ToyT2IConfig`) with random weights."""
    from diffusers import StableDiffusionPipeline

    from .backbones.t2i import ToyT2IConfig, build_toy_text_encoder, build_toy_unet, build_toy_vae, training_scheduler

    cfg = ToyT2IConfig()
    if resolution != cfg.image_size:
        raise UserError(f"bench --resolution {resolution}: the toy architecture is {cfg.image_size} px")
    tok = _clip_tokenizer(32)
    return StableDiffusionPipeline(vae=build_toy_vae(cfg), text_encoder=build_toy_text_encoder(cfg, tok), tokenizer=tok,
                                   unet=build_toy_unet(cfg, cfg.image_size // 4), scheduler=training_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def t2i_pipeline(o: BenchOptions):
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    pipe = (toy_pipeline if o.t2i_arch == "toy" else sd15_pipeline)(o.resolution)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as backbones.t2i.load_pipeline does
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(o.device)


def cls_backbone(o: BenchOptions):
    from .backbones.vit import PAPER_VIT, ToyViTConfig, ViTBackbone, build_vit

    torch.manual_seed(0)
    if o.cls_arch == "toy":
        vit = build_vit("toy_vit", ToyViTConfig().timm_kwargs())
    else:
        vit = build_vit(PAPER_VIT.split(".")[0])
    return ViTBackbone(vit).to(o.device)


# ------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gaps(stamps: list[float], warmup: int) -> list[float]:
    """The durations of the steps whose start times are ``stamps``, the first ``warmup`` steps left out."""
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def _median_rate(stamps: list[float], warmup: int, items: int) -> float:
    """Items per second from the start times of consecutive steps, the first ``warmup`` steps left out."""
    gaps = _gaps(stamps, warmup)
    if not gaps:
        raise UserError("bench: too few steps to time (steps must be >= 1 after warm-up)")
    return items / statistics.median(gaps)


def _timed(fn, n: int, device: str) -> list[float]:
    """Start times of ``n + 1`` calls' boundaries: stamps[i] before call i, the last after the final call."""
    stamps = []
    for _ in range(n):
        _sync(device)
        stamps.append(time.perf_counter())
        fn()
    _sync(device)
    stamps.append(time.perf_counter())
    return stamps


def _flops(fn) -> float:
    """Model FLOPs of one call (matmuls and convolutions, forward and backward as ``fn`` runs them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _peak_memory_gb(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_peak_rss"


# ------------------------------------------------------------------------------------------- t2i cases
def _t2i_task(o: BenchOptions, n_images: int = 8):
    from .methods.base import Task

    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, o.resolution, o.resolution, generator=g)
    return Task(index=1, concept="bench", token="<v1>", prompt="a photo of <v1>", images=images, class_word="person",
                class_captions=["a photo of a person"])


def t2i_train_ours(o: BenchOptions) -> dict:
    """C-LoRA through the engine's task loop; the step times are read off ``method.loss``'s calls."""
    from .backbones.model import T2IModel
    from .engine.t2i import train_one_task
    from .methods.base import build_settings
    from .methods.registry import get_method

    cls = get_method("t2i", "c_lora")
    s = build_settings(cls.Settings, {"steps": o.warmup + o.steps + 1, "batch_size": o.batch, "rank": o.rank,
                                      "alpha": float(o.rank)}, "bench")
    method = cls(T2IModel(t2i_pipeline(o), device=o.device), s, seed=0)
    from torch.utils.flop_counter import FlopCounterMode

    stamps, inner, counter = [], method.loss, FlopCounterMode(display=False)

    def loss(batch):  # the first (warm-up) step runs under the FLOP counter: forward, backward and update
        _sync(o.device)
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            counter.__enter__()
        elif len(stamps) == 2:
            counter.__exit__(None, None, None)
        return inner(batch)

    method.loss = loss
    t0 = time.perf_counter()
    train_one_task(method, _t2i_task(o), seed=0)
    task_s = time.perf_counter() - t0
    return {"rate": _median_rate(stamps, o.warmup, 1), "unit": "steps/s", "items": o.batch,
            "model_flops_per_item": counter.get_total_flops() / o.batch, "task_seconds": task_s}


def t2i_train_reference(o: BenchOptions) -> dict:
    """The examples' step: diffusers' LoRA example (peft LoRA on the UNet's attention projections, fp32, the VAE
    encoding the images and the text encoder the prompt at every step, AdamW, clipping at 1) with the concept
    token trained as Custom Diffusion's example trains its modifier token (the whole embedding table in the
    optimizer, every other row's gradient zeroed after backward), as C-LoRA trains its token too."""
    import torch.nn.functional as F
    from peft import LoraConfig

    pipe = t2i_pipeline(o)
    unet, vae, text, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text):
        m.requires_grad_(False)
    tok.add_tokens(["<new1>"])
    text.resize_token_embeddings(len(tok))
    new_id = tok.convert_tokens_to_ids("<new1>")
    emb = text.get_input_embeddings().weight
    emb.requires_grad_(True)
    unet.add_adapter(LoraConfig(r=o.rank, lora_alpha=o.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad] + [emb]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = pipe.scheduler
    pixels = _t2i_task(o, o.batch).images.to(o.device) * 2 - 1
    ids = tok(["a photo of <new1> person"] * o.batch, padding="max_length", truncation=True,
              max_length=tok.model_max_length, return_tensors="pt").input_ids.to(o.device)
    others = torch.arange(len(tok), device=o.device) != new_id

    def step():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (o.batch,), device=o.device)
        pred = unet(sched.add_noise(latents, noise, t), t, text(ids)[0]).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        emb.grad[others] = 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    flops = _flops(step)  # also the first warm-up step
    stamps = _timed(step, o.warmup - 1 + o.steps, o.device)
    return {"rate": _median_rate(stamps, o.warmup - 1, 1), "unit": "steps/s", "items": o.batch,
            "model_flops_per_item": flops / o.batch}


def _method_tasks(o: BenchOptions, n_images: int = 8):
    """``o.method_tasks`` tasks of random images, each with the ones before it as its past."""
    from .methods.base import Task

    import itertools

    g = torch.Generator().manual_seed(0)
    words = (["young", "old", "smiling", "serious", "tired", "happy", "calm", "surprised"],
             ["red hat", "green scarf", "blue shirt", "black coat", "white dress", "yellow tie", "grey hoodie",
              "glasses"],
             ["street", "park", "beach", "office", "kitchen", "forest", "studio", "train station"])
    captions = [f"a photo of a {a} person wearing a {b} in the {c}" for a, b, c in itertools.product(*words)]
    tasks = []
    for i in range(1, o.method_tasks + 1):
        tasks.append(Task(index=i, concept=f"bench{i}", token=f"<v{i}>", prompt=f"a photo of <v{i}>",
                          images=torch.rand(n_images, 3, o.resolution, o.resolution, generator=g), class_word="person",
                          past=list(tasks), class_captions=captions))
    return tasks


def t2i_method(o: BenchOptions) -> dict:
    """One method's tasks through the engine (module docstring): step rate, state bytes and the UNet evaluations
    outside the steps, per task. As in a run, each task starts from a fresh model given the state the task before
    kept (:meth:`~continual_bench.engine.runner.BaseRunSpec.restore`): the state goes through a safetensors file
    and the model is built again from the same seed."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    from safetensors.torch import load_file, save_file

    from .backbones.model import T2IModel
    from .engine.t2i import train_one_task
    from .methods.base import build_settings
    from .methods.registry import get_method

    cls = get_method("t2i", o.method)
    given = {**o.method_settings, "steps": o.warmup + o.steps + 1}
    if "ridge" in cls.Settings.__dataclass_fields__ and not given.get("ridge"):
        given["ridge"] = 1e-6  # random weights give a degenerate text space; a closed-form solve costs the same
    s = build_settings(cls.Settings, given, f"bench {o.method}")
    in_step = [False]
    outside = {"nograd": 0, "grad": 0}
    stamps: list[float] = []

    def counted(real_forward):
        def forward(sample, *args, **kwargs):  # outside a step: count; without gradients, answer zeros
            if in_step[0]:
                return real_forward(sample, *args, **kwargs)
            if torch.is_grad_enabled():
                outside["grad"] += sample.shape[0]
                return real_forward(sample, *args, **kwargs)
            outside["nograd"] += sample.shape[0]
            out = UNet2DConditionOutput(sample=torch.zeros_like(sample))
            return out if kwargs.get("return_dict", True) else (out.sample,)
        return forward

    def timed(inner):
        def loss(batch):
            _sync(o.device)
            stamps.append(time.perf_counter())
            in_step[0] = True
            try:
                return inner(batch)
            finally:
                in_step[0] = False
        return loss

    tasks = _method_tasks(o)
    step_s, nograd, grad, state_bytes = [], [], [], []
    t0 = time.perf_counter()
    model = method = None
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        state_file = Path(tmp) / "state.safetensors"
        for task in tasks:
            del model, method  # the task before's model goes before the next is built
            gc.collect()
            torch.manual_seed(0)  # the same random weights for every task (one model in memory at a time)
            model = T2IModel(t2i_pipeline(o), device=o.device)
            model.unet.forward = counted(model.unet.forward)
            method = cls(model, s, seed=0)
            if task.index > 1:
                method.load_state(load_file(str(state_file), device=o.device), tasks[:task.index - 1])
            method.loss = timed(method.loss)
            stamps.clear()
            outside.update(nograd=0, grad=0)
            train_one_task(method, task, seed=0)
            step_s += _gaps(stamps, o.warmup)
            nograd.append(outside["nograd"])
            grad.append(outside["grad"])
            save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(state_file))
            state_bytes.append(state_file.stat().st_size)  # what the task's state.safetensors holds in a run
    if not step_s:
        raise UserError(f"bench {o.method}: too few steps to time ({o.steps})")
    # a step is grad_accum loss calls (micro-batches) apart
    return {"rate": 1.0 / (statistics.median(step_s) * s.grad_accum), "unit": "steps/s",
            "items": s.batch_size * s.grad_accum, "task_seconds": (time.perf_counter() - t0) / len(tasks),
            "outside_nograd": nograd, "outside_grad": grad, "state_bytes": state_bytes}


def _prompts(n: int) -> list[str]:
    return [f"a photo of a person number {i}" for i in range(n)]


def t2i_sample_ours(o: BenchOptions) -> dict:
    from .backbones.model import T2IModel

    model = T2IModel(t2i_pipeline(o), device=o.device)
    run = lambda: model.generate(_prompts(o.n_images), seed=0, steps=o.sample_steps, guidance=o.guidance)  # noqa: E731
    run()  # warm-up
    stamps = _timed(run, 1, o.device)
    return {"rate": o.n_images / (stamps[1] - stamps[0]), "unit": "images/s", "items": o.n_images}


def t2i_sample_reference(o: BenchOptions) -> dict:
    pipe = t2i_pipeline(o)
    g = torch.Generator(o.device).manual_seed(0)
    prompts = _prompts(o.n_images)
    pipe(prompts[0], num_inference_steps=o.sample_steps, guidance_scale=o.guidance, generator=g)  # warm-up
    stamps = _timed(lambda: [pipe(p, num_inference_steps=o.sample_steps, guidance_scale=o.guidance, generator=g)
                             for p in prompts], 1, o.device)
    return {"rate": o.n_images / (stamps[1] - stamps[0]), "unit": "images/s", "items": o.n_images}


# ------------------------------------------------------------------------------------------- cls cases
def _coda_p(o: BenchOptions, precision: str):
    from .methods.base import build_settings
    from .methods.cls_base import ClsTask
    from .methods.registry import get_method

    cls = get_method("cls", "coda_p")
    s = build_settings(cls.Settings, {"batch_size": o.cls_batch, "precision": precision}, "bench")
    method = cls(cls_backbone(o), s, seed=0, n_classes=200, n_tasks=10)
    task = ClsTask(index=1, classes=list(range(20)), lo=0, hi=20, n_tasks=10)
    method.begin_task(task)
    method.to(o.device)
    size = method.backbone.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(o.cls_batch, 3, size, size, generator=g).to(o.device)
    y = torch.randint(0, 20, (o.cls_batch,), generator=g).to(o.device)
    return method, task, x, y


def _cls_rate(o: BenchOptions, way: str, train: bool) -> dict:
    """Ours: the profile's precision, the query precomputed where the engine precomputes it (toy profile: fixed
    views; evaluation: once per run). Reference (CODA-P): fp32, query pass + prompted pass for every batch."""
    from .engine.runner import TaskLoop, amp_context

    precision = "bf16" if way == "ours" else "fp32"
    method, task, x, y = _coda_p(o, precision)
    cached = way == "ours" and (not train or o.cls_arch == "toy")
    with torch.no_grad():
        cache = method.precompute(x) if cached else None
    if train:
        groups = [grp for grp in method.param_groups() if grp["params"]]
        loop = TaskLoop(method, task, torch.optim.Adam(groups, lr=1e-3), groups, device=o.device, precision=precision)
        batch = {"x": x, "y": y, "task": task, "step": 0, **({"cache": cache} if cache else {})}
        method.train()
        fn = lambda: loop.step([batch], "bench")  # noqa: E731
        flop_fn = lambda: method.loss(batch)["loss"].backward()  # noqa: E731
    else:
        amp = amp_context(o.device, precision)
        method.eval()

        def fn():
            with torch.no_grad(), amp():
                method.logits(x, cache)
        flop_fn = fn
    stamps = _timed(fn, o.warmup + o.cls_steps, o.device)
    flops = _flops(flop_fn) / o.cls_batch
    return {"rate": _median_rate(stamps, o.warmup, o.cls_batch), "unit": "images/s", "items": o.cls_batch,
            "model_flops_per_item": flops}


def cls_method(o: BenchOptions) -> dict:
    """One classification method's tasks (``o.method_tasks`` of 20 classes) the way the engine trains them (module
    docstring): each task from a fresh method given the state the task before kept, ``begin_task``, the method's
    passes over the task's images (``before_training`` / ``after_training``, timed on one image per class), then
    ``cls_steps`` optimizer steps through :class:`~continual_bench.engine.runner.TaskLoop` on un-cached batches (the
    paper profile's RandomResizedCrop gives no fixed views); a task whose ``param_groups()`` hold nothing runs none.
    Evaluation: the method's logits, its frozen-backbone features (prompt queries) computed beforehand, as the
    engine computes the test images' once per run."""
    from safetensors.torch import load_file, save_file

    from .engine.runner import TaskLoop, amp_context
    from .methods.base import build_settings
    from .methods.cls_base import ClsTask
    from .methods.registry import get_method

    cls = get_method("cls", o.method)
    s = build_settings(cls.Settings, {**o.method_settings, "batch_size": o.cls_batch}, f"bench {o.method}")
    amp = amp_context(o.device, s.precision)
    per = 20
    tasks: list[ClsTask] = []
    step_s, trains, hook_s, state_bytes = [], [], [], []
    method = None
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        state_file = Path(tmp) / "state.safetensors"
        for t in range(1, o.method_tasks + 1):
            task = ClsTask(index=t, classes=list(range((t - 1) * per, t * per)), lo=(t - 1) * per, hi=t * per,
                           n_tasks=10, past=list(tasks))
            tasks.append(task)
            del method
            gc.collect()
            method = cls(cls_backbone(o), s, seed=0, n_classes=10 * per, n_tasks=10)
            if t > 1:
                method.load_state(load_file(str(state_file), device=o.device), tasks[:-1])
            g = torch.Generator().manual_seed(t)
            size = method.backbone.img_size
            x = torch.rand(o.cls_batch, 3, size, size, generator=g).to(o.device)
            y = torch.randint(task.lo, task.hi, (o.cls_batch,), generator=g).to(o.device)
            hx = torch.rand(per, 3, size, size, generator=g).to(o.device)  # one image of every class of the task
            hy = torch.arange(task.lo, task.hi, device=o.device)
            images = lambda: ((hx[i:i + o.cls_batch], hy[i:i + o.cls_batch])  # noqa: E731
                              for i in range(0, per, o.cls_batch))
            method.begin_task(task)
            method.to(o.device)
            method.eval()
            t0 = time.perf_counter()
            with torch.no_grad(), amp():
                method.before_training(task, images)
            hooks = time.perf_counter() - t0
            groups = [grp for grp in method.param_groups() if grp["params"]]
            trains.append(int(bool(groups)))
            if groups:
                loop = TaskLoop(method, task, torch.optim.Adam(groups, lr=s.lr), groups, device=o.device,
                                precision=s.precision)
                method.train()
                batch = {"x": x, "y": y, "task": task, "step": 0}
                stamps = _timed(lambda: loop.step([batch], "bench"), o.warmup + o.cls_steps, o.device)  # noqa: B023
                step_s += _gaps(stamps, o.warmup)
            method.eval()
            _sync(o.device)
            t0 = time.perf_counter()
            with torch.no_grad(), amp():
                method.after_training(task, images)
            _sync(o.device)
            hook_s.append(hooks + time.perf_counter() - t0)
            method.end_task(task)
            save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(state_file))
            state_bytes.append(state_file.stat().st_size)
    with torch.no_grad():
        cache = method.precompute(x)

    def evaluate():
        with torch.no_grad(), amp():
            method.logits(x, cache)
    ev = _timed(evaluate, o.warmup + o.cls_steps, o.device)
    return {"rate": o.cls_batch / statistics.median(step_s) if step_s else 0.0, "unit": "images/s",
            "items": o.cls_batch, "eval_images_per_s": _median_rate(ev, o.warmup, o.cls_batch),
            "trains": trains, "hook_s": [round(h, 4) for h in hook_s], "hook_passes": hook_passes(cls),
            "state_bytes": state_bytes}


def hook_passes(cls) -> int:
    """How many of the per-task passes over the training images (``before_training``, ``after_training``) the
    method class overrides: each reads the task's images once."""
    from .methods.cls_base import ClsMethod

    return sum(getattr(cls, h) is not getattr(ClsMethod, h) for h in ("before_training", "after_training"))


CASE_FUNCS = {
    ("t2i_train", "ours"): t2i_train_ours, ("t2i_train", "reference"): t2i_train_reference,
    ("t2i_sample", "ours"): t2i_sample_ours, ("t2i_sample", "reference"): t2i_sample_reference,
    ("cls_train", "ours"): lambda o: _cls_rate(o, "ours", True),
    ("cls_train", "reference"): lambda o: _cls_rate(o, "reference", True),
    ("cls_eval", "ours"): lambda o: _cls_rate(o, "ours", False),
    ("cls_eval", "reference"): lambda o: _cls_rate(o, "reference", False),
    ("t2i_method", "ours"): t2i_method,
    ("cls_method", "ours"): cls_method,
}


# ------------------------------------------------------------------------------------------- driver
def run_case(case: str, way: str, o: BenchOptions) -> dict:
    """One case one way, in this process: its measurement and this process's peak memory."""
    if o.warmup < 1:
        raise UserError(f"bench: warmup {o.warmup}; at least 1 warm-up step (the first step is not timed)")
    set_threads(o.threads)  # an isolated case's process starts with torch's default (every core), not --threads
    res = CASE_FUNCS[(case, way)](o)
    mem, kind = _peak_memory_gb(o.device)
    return {**res, "peak_memory_gb": round(mem, 3), "memory_kind": kind, "threads": torch.get_num_threads()}


def run_isolated(case: str, way: str, o: BenchOptions, timeout: float = 3600) -> dict:
    """:func:`run_case` in a fresh Python process (its own peak memory, no warm caches from another case)."""
    cmd = [sys.executable, "-m", "continual_bench.bench", case, way, json.dumps(asdict(o))]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"bench {case} ({way}) failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def device_name(device: str, n: int) -> str:
    """The GPU's name, or the CPU with the ``n`` torch threads the cases ran with."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {n} thread{'s' if n > 1 else ''}"


def peak_tflops(name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype]
    return None


def case_row(case: str, way: str, o: BenchOptions, res: dict, name: str) -> dict:
    t2i = case.startswith("t2i")
    if case == "cls_method" and not res["rate"]:  # a method that trains nothing (SimpleCIL): no training rate
        res = {**res, "rate": float("nan")}
    dtype = "bf16" if way == "ours" and o.device.startswith("cuda") else "fp32"
    items_s = res["rate"] * (res["items"] if res["unit"] == "steps/s" else 1)
    flops = res.get("model_flops_per_item")
    tflops = items_s * flops / 1e12 if flops else None
    peak = peak_tflops(name, dtype) if o.device.startswith("cuda") else None
    return {"case": case, "way": way, "arch": o.t2i_arch if t2i else o.cls_arch,
            "resolution": o.resolution if t2i else (224 if o.cls_arch == "vitb16" else 32),
            "batch": res["items"], "sample_steps": o.sample_steps if case == "t2i_sample" else None,
            "guidance": o.guidance if case == "t2i_sample" else None, "dtype": dtype,
            "rate": round(res["rate"], 5), "unit": res["unit"], "items_per_s": round(items_s, 5),
            "model_gflops_per_item": round(flops / 1e9, 2) if flops else None,
            "model_tflops_per_s": round(tflops, 4) if tflops else None,
            "mfu": round(tflops / peak, 4) if tflops and peak else None,
            "peak_memory_gb": res["peak_memory_gb"], "memory_kind": res["memory_kind"],
            "task_seconds": round(res["task_seconds"], 2) if "task_seconds" in res else None,
            **({"method": o.method, **{k: ";".join(map(str, res[k])) for k in PER_TASK}}
               if case == "t2i_method" else {}),
            **({"method": o.method, "eval_images_per_s": round(res["eval_images_per_s"], 5),
                "hook_passes": res["hook_passes"], **{k: ";".join(map(str, res[k])) for k in CLS_PER_TASK}}
               if case == "cls_method" else {})}


PER_TASK = ("outside_nograd", "outside_grad", "state_bytes")  # t2i_method: one value per task, ';'-joined
CLS_PER_TASK = ("trains", "hook_s", "state_bytes")  # cls_method: one value per task, ';'-joined


def bench(o: BenchOptions, cases: list[str], host: str, out: str | Path | None, runner=run_isolated,
          methods: dict[str, dict] | None = None, cls_methods: dict[str, dict] | None = None):
    """Every case both ways, then every method of ``methods`` (text-to-image) and ``cls_methods`` (classification;
    name -> its settings) our way; the rows (with ``ratio`` = ours / reference where there is a reference) written to
    ``out`` as CSV."""
    import pandas as pd

    from .methods.registry import get_method
    from .utils import progress

    bad = [c for c in cases if c not in CASES]
    if bad:
        raise UserError(f"bench: unknown case(s) {bad}; known: {list(CASES)}")
    for track, names in (("t2i", methods), ("cls", cls_methods)):
        for m in names or {}:
            get_method(track, m)  # an unknown name stops here, before anything is timed
    o = o.resolved()
    name = device_name(o.device, o.threads)
    jobs = [(c, w, o) for c in cases for w in WAYS]
    jobs += [("t2i_method", "ours", replace(o, method=m, method_settings=dict(st or {})))
             for m, st in (methods or {}).items()]
    jobs += [("cls_method", "ours", replace(o, method=m, method_settings=dict(st or {})))
             for m, st in (cls_methods or {}).items()]
    rows = []
    for case, way, oo in progress(jobs, desc="bench"):
        rows.append(case_row(case, way, oo, runner(case, way, oo), name))
    df = pd.DataFrame(rows)
    ref = df[df.way == "reference"].set_index("case").items_per_s
    df["ratio"] = [round(r.items_per_s / ref[r.case], 3) if r.way == "ours" and r.case in ref.index else None
                   for r in df.itertuples()]
    df.insert(0, "device_name", name)
    df.insert(0, "device", o.device)
    df.insert(0, "host", host)
    df["date"] = time.strftime("%Y-%m-%d")
    df["git_commit"] = git_commit()
    df["packages"] = package_versions()
    if out:
        with atomic_path(out, suffix=".csv") as tmp:
            df.to_csv(tmp, index=False)
    return df


# ------------------------------------------------------------------------------------------- costs
IMAGENET_R = {"train": 24000, "test": 6000}  # CODA-Prompt's ImageNet-R split (80/20 of 30,000 images)


def t2i_images_per_run(n_tasks: int, n_samples: int, n_templates: int, full_matrix: bool = False) -> int:
    """Images one run generates (:func:`~continual_bench.evaluation.t2i_eval.generate_run`): each evaluated
    (t, k) pair with a concept ``n_samples`` images (and ``n_samples`` more over the text templates, if any), and
    the generic prompt before and after the sequence."""
    from .evaluation.t2i_eval import pairs_to_generate

    pairs = len(pairs_to_generate(n_tasks, full_matrix))
    return pairs * n_samples * (2 if n_templates else 1) + 2 * n_samples


def _t2i_steps(config: dict, benchmark: str, method: str = "c_lora") -> int:
    """A method's training steps per task on ``benchmark``: benchmark_settings, else method_settings, else its
    default (C-LoRA's, for the table that costs every method at C-LoRA's step)."""
    from .methods.registry import get_method

    for scope in (config.get("benchmark_settings", {}).get(benchmark, {}),
                  config.get("method_settings", {}).get(method, {})):
        if "steps" in scope:
            return int(scope["steps"])
    return get_method("t2i", method).Settings().steps


def per_task(measured: list[float], n_tasks: int) -> list[float]:
    """Values measured for a method's first tasks, carried to ``n_tasks``: as measured where measured, then linear
    in t from the last two (work over the past grows linearly: replay, distillation of every earlier concept, an
    adapter kept per concept; work done once, as DreamBooth's class images, stays done), never below 0."""
    vals = [float(v) for v in measured]
    slope = vals[-1] - vals[-2] if len(vals) > 1 else 0.0
    return [vals[t] if t < len(vals) else max(0.0, vals[-1] + slope * (t + 1 - len(vals))) for t in range(n_tasks)]


def _eval_images(config: dict, n_tasks: int) -> int:
    ev = config.get("evaluation", {})
    return t2i_images_per_run(n_tasks, ev.get("n_samples", 32), len(ev.get("text_templates") or []),
                              ev.get("full_matrix", False))


def method_cost_table(df, config: dict):
    """Hours, checkpoint disk and peak memory per text-to-image method of ``config`` measured in ``df``
    (``t2i_method`` rows), per benchmark and sequence length.

    Per run: ``sum_t steps / rate`` (the method's own step rate) + the UNet evaluations with gradients outside the
    steps at the training rate per image + the no-grad ones (sampling inside training) at the sampling rate per UNet
    evaluation (``t2i_sample``, ours: images/s x steps x 2 under guidance; it includes text encoding and decoding,
    so this errs high) + the evaluation's images as in :func:`cost_table`; disk: every task's state, kept by the
    engine. Per-task counts beyond the measured tasks: :func:`per_task`.
    """
    import pandas as pd

    if "case" not in df or not (df.case == "t2i_method").any() or not (df.case == "t2i_sample").any():
        return pd.DataFrame()
    rows_m = df[df.case == "t2i_method"].set_index("method")
    sa = df[(df.case == "t2i_sample") & (df.way == "ours")].iloc[0]
    evals_per_s = sa.rate * sa.sample_steps * (2 if sa.guidance > 1 else 1)
    ev_steps = config.get("evaluation", {}).get("sample_steps", sa.sample_steps)
    rows = []
    for T in config.get("n_tasks", []):
        gen_h = _eval_images(config, T) / sa.rate * (ev_steps / sa.sample_steps) / 3600
        for bench_name in config.get("benchmarks", []):
            for m in config.get("methods", []):
                if m not in rows_m.index:
                    continue
                r = rows_m.loc[m]
                split = lambda col: [float(v) for v in str(r[col]).split(";")]  # noqa: E731
                steps = _t2i_steps(config, bench_name, m)
                train_s = T * steps / r.rate + sum(per_task(split("outside_grad"), T)) / (r.rate * r.batch)
                sample_s = sum(per_task(split("outside_nograd"), T)) / evals_per_s
                n_runs = len(config.get("seeds", []))
                rows.append({"benchmark": bench_name, "n_tasks": T, "method": m, "steps": steps,
                             "train_h_per_run": train_s / 3600, "sample_in_training_h_per_run": sample_s / 3600,
                             "evaluation_h_per_run": gen_h, "runs": n_runs,
                             "total_h": (train_s / 3600 + sample_s / 3600 + gen_h) * n_runs,
                             "checkpoints_gb_per_run": sum(per_task(split("state_bytes"), T)) / 1e9,
                             "peak_memory_gb": r.peak_memory_gb})
    return pd.DataFrame(rows)


def cost_table(df, config: dict):
    """Hours per run and in all for each track of ``config`` at the rates measured in ``df`` (our ways).

    Text-to-image: ``n_tasks x steps / (training steps/s)`` + ``images / (images/s)``, the sampling rate scaled
    from the bench's steps to the evaluation's (sampling time is linear in steps). Every method is costed at
    C-LoRA's step: methods that sample during training (class images, replay, teacher trajectories) cost more.
    Classification: ``epochs x 24,000 / (train images/s)`` + the test images of every seen task after each task.
    """
    import pandas as pd

    ours = df[df.way == "ours"].set_index("case")
    rows = []
    ev = config.get("evaluation", {})
    for T in config.get("n_tasks", []):
        if {"t2i_train", "t2i_sample"} <= set(ours.index):
            tr, sa = ours.loc["t2i_train"], ours.loc["t2i_sample"]
            for bench_name in config.get("benchmarks", []):
                steps = _t2i_steps(config, bench_name)
                train_h = T * steps / tr.rate / 3600
                n_img = t2i_images_per_run(T, ev.get("n_samples", 32), len(ev.get("text_templates") or []),
                                           ev.get("full_matrix", False))
                gen_h = n_img / sa.rate * (ev.get("sample_steps", sa.sample_steps) / sa.sample_steps) / 3600
                n_runs = len(config.get("methods", [])) * len(config.get("seeds", []))
                rows.append({"track": "t2i", "what": f"{bench_name}, {T} tasks x {steps} steps, {n_img} images",
                             "train_h_per_run": train_h, "generate_h_per_run": gen_h, "runs": n_runs,
                             "total_h": (train_h + gen_h) * n_runs, "peak_memory_gb": tr.peak_memory_gb})
        if {"cls_train", "cls_eval"} <= set(ours.index) and config.get("cls_methods"):
            tr, ev_r = ours.loc["cls_train"], ours.loc["cls_eval"]
            epochs = config.get("cls_train", {}).get("epochs", 50)
            train_h = epochs * IMAGENET_R["train"] / tr.items_per_s / 3600
            eval_h = IMAGENET_R["test"] * (T + 1) / 2 / ev_r.items_per_s / 3600
            n_runs = len(config["cls_methods"]) * len(config.get("seeds", []))
            rows.append({"track": "cls", "what": f"ImageNet-R, {T} tasks, {epochs} epochs", "train_h_per_run": train_h,
                         "generate_h_per_run": eval_h, "runs": n_runs, "total_h": (train_h + eval_h) * n_runs,
                         "peak_memory_gb": tr.peak_memory_gb})
    return pd.DataFrame(rows)


def cost_markdown(df, config: dict) -> str:
    """The README's cost table from a bench CSV (``df``) and the paper profile's configuration."""
    costs = cost_table(df, config)
    first = df.iloc[0]
    train = df[df.case == "t2i_train"]
    t2i = f"; text-to-image at {int(train.resolution.iloc[0])} px, training batch {int(train.batch.iloc[0])}" \
        if len(train) else ""
    head = (f"Measured by `continual-bench bench` on {first.device_name} ({first.host}, {first.date}){t2i}. Hours per "
            "run = the configuration's steps and images at the measured rates" +
            (" (every method at C-LoRA's step; methods that sample during training cost more).\n\n" if len(costs)
             else ".\n\n"))
    lines = ["| track | run | training h/run | sampling/evaluation h/run | runs | hours in all | peak memory (GB) |",
             "|---|---|---|---|---|---|---|"] if len(costs) else ["(no C-LoRA step measured: no table at its rate)"]
    for r in costs.itertuples():
        lines.append(f"| {r.track} | {r.what} | {r.train_h_per_run:,.2f} | {r.generate_h_per_run:,.2f} | {r.runs} | "
                     f"{r.total_h:,.0f} | {r.peak_memory_gb:.1f} |")
    ratios = df[(df.way == "ours") & df.ratio.notna()][["case", "ratio"]].itertuples()
    tail = "\n\nOurs / reference: " + ", ".join(f"{r.case} {r.ratio:.2f}x" for r in ratios) + "\n"
    return head + "\n".join(lines) + tail + method_cost_markdown(df, config)


def cls_settings(config: dict, method: str) -> dict:
    """A classification method's settings in ``config``: ``cls_train``, then its ``cls_method_settings`` entry."""
    return {**(config.get("cls_train") or {}), **((config.get("cls_method_settings") or {}).get(method) or {})}


def cls_method_cost_table(df, config: dict):
    """Hours, kept state and peak memory per classification method of ``config`` measured in ``df`` (``cls_method``
    rows), per sequence length, on ImageNet-R (:data:`IMAGENET_R`).

    Per run of T tasks (24,000 / T training images each; a ``joint`` method, the upper bound, trains one task of all
    24,000 and is evaluated once): the tasks that train (``trains``) x ``epochs`` passes at
    the method's training rate; per task, its passes over the task's images (``hook_passes`` x the images at its
    evaluation rate) plus what those hooks took on one image per class (``hook_s``: fixed work such as RanPAC's ridge
    selection; work that grows with the images beyond the pass itself, such as RanPAC's Gram products, 2 M^2 flops
    per image, is timed on those images only, so the passes' hours are a lower bound); the evaluation of every seen
    task after every task at its evaluation rate. Disk: the state after the last task (this track keeps only the
    latest). Per-task values beyond the measured tasks: the last one (``trains``, ``hook_s``) or carried on linearly
    (``state_bytes``, :func:`per_task`). Epochs: :func:`cls_settings`, else the method's default.
    """
    import pandas as pd

    if "case" not in df or not (df.case == "cls_method").any():
        return pd.DataFrame()
    from .methods.registry import get_method

    rows_m = df[df.case == "cls_method"].set_index("method")
    n_runs = len(config.get("cls_seeds", config.get("seeds", [])))
    rows = []
    for T in config.get("cls_n_tasks", config.get("n_tasks", [])):
        for m in config.get("cls_methods", []):
            if m not in rows_m.index:
                continue
            r = rows_m.loc[m]
            cls = get_method("cls", m)
            k = 1 if cls.joint else T  # tasks trained: a joint method trains one task of every class
            per_task_images = IMAGENET_R["train"] / k
            measured = {c: [float(v) for v in str(r[c]).split(";")] for c in CLS_PER_TASK}
            last = {c: [v[min(t, len(v) - 1)] for t in range(k)] for c, v in measured.items()}
            epochs = cls_settings(config, m).get("epochs", cls.Settings().epochs)
            trains = sum(last["trains"])
            train_s = trains * epochs * per_task_images / r.rate if trains else 0.0
            hooks_s = sum(last["hook_s"]) + k * int(r.hook_passes) * per_task_images / r.eval_images_per_s
            eval_s = IMAGENET_R["test"] * (1 if cls.joint else (T + 1) / 2) / r.eval_images_per_s
            rows.append({"n_tasks": T, "method": m, "epochs": epochs, "train_h_per_run": train_s / 3600,
                         "passes_h_per_run": hooks_s / 3600, "evaluation_h_per_run": eval_s / 3600, "runs": n_runs,
                         "total_h": (train_s + hooks_s + eval_s) / 3600 * n_runs,
                         "state_gb": per_task(measured["state_bytes"], k)[-1] / 1e9,
                         "peak_memory_gb": r.peak_memory_gb})
    return pd.DataFrame(rows)


def method_cost_markdown(df, config: dict) -> str:
    """The per-method tables (:func:`method_cost_table`, :func:`cls_method_cost_table`) as Markdown; empty without
    per-method rows."""
    return _t2i_method_markdown(df, config) + _cls_method_markdown(df, config)


def _markdown_table(intro: str, head: list[str], rows: list[list[str]]) -> str:
    """``intro``, then a Markdown table with columns ``head`` and ``rows`` (an empty cell stays empty)."""
    line = lambda cells: "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"  # noqa: E731
    return "\n".join([intro, line(head), "|" + "---|" * len(head)] + [line(r) for r in rows]) + "\n"


def _cls_method_markdown(df, config: dict) -> str:
    mc = cls_method_cost_table(df, config)
    if mc.empty:
        return ""
    r0 = df[df.case == "cls_method"].iloc[0]
    rows = [[r.n_tasks, r.method, r.epochs, f"{r.train_h_per_run:,.2f}", f"{r.passes_h_per_run:,.2f}",
             f"{r.evaluation_h_per_run:,.2f}", r.runs, f"{r.total_h:,.0f}", f"{r.state_gb:,.2f}",
             f"{r.peak_memory_gb:.1f}"] for r in mc.itertuples()]
    rows.append(["all", "", "", "", "", "", int(mc.runs.sum()), f"{mc.total_h.sum():,.0f}", "", ""])
    return _markdown_table(
        f"\nPer classification method (ImageNet-R, {r0.arch}, batch {int(r0.batch)}, each method's own step, passes "
        "and settings; a task that trains nothing runs no step; the state kept is the last task's):\n",
        ["tasks", "method", "epochs", "training h/run", "passes over the images h/run", "evaluation h/run", "runs",
         "hours in all", "state kept (GB)", "peak memory (GB)"], rows)


def _t2i_method_markdown(df, config: dict) -> str:
    mc = method_cost_table(df, config)
    if mc.empty:
        return ""
    r0 = df[df.case == "t2i_method"].iloc[0]
    rows = [[r.benchmark, f"{r.n_tasks} x {r.steps}", r.method, f"{r.train_h_per_run:,.2f}",
             f"{r.sample_in_training_h_per_run:,.2f}", f"{r.evaluation_h_per_run:,.2f}", r.runs, f"{r.total_h:,.0f}",
             f"{r.checkpoints_gb_per_run:,.2f}", f"{r.peak_memory_gb:.1f}"] for r in mc.itertuples()]
    rows.append(["all", "", "", "", "", "", int(mc.runs.sum()), f"{mc.total_h.sum():,.0f}",
                 f"{(mc.checkpoints_gb_per_run * mc.runs).sum():,.0f} (all runs)", ""])
    return _markdown_table(
        f"\nPer text-to-image method ({int(r0.resolution)} px, each method's own step and settings; sampling inside "
        "training and gradient passes outside the steps counted per task over the first tasks and carried on "
        "linearly; checkpoints: every task's state, as the engine keeps them):\n",
        ["benchmark", "tasks x steps", "method", "training h/run", "sampling in training h/run", "evaluation h/run",
         "runs", "hours in all", "checkpoints GB/run", "peak memory (GB)"], rows)


if __name__ == "__main__":  # one isolated case (run_isolated): python -m continual_bench.bench CASE WAY OPTIONS_JSON
    _case, _way, _opts = sys.argv[1:4]
    print(json.dumps(run_case(_case, _way, BenchOptions(**json.loads(_opts)))))
