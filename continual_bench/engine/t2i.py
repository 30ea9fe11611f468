"""The text-to-image training engine: one loop for every method, a checkpoint per finished task.

Resuming is exact by construction: before every task the model is rebuilt from the backbone on disk and
the previous task's checkpoint (``method.load_state``), whether or not the process was restarted, and
every task's randomness is seeded from (seed, task). A killed run therefore continues at the first task
without a checkpoint and produces the same numbers as an uninterrupted one.

Checkpoint layout (``ckpt_dir``, the run's ``checkpoints/`` folder)::

    <fingerprint>/run.json                what the fingerprint covers
    <fingerprint>/task_001/state.safetensors   method.state_dict() after task 1
    <fingerprint>/task_001/meta.json           task, concept, N_train, N_store, loss curve summary, seconds,
                                               state_sha256 (the sha256 of state.safetensors)

A task counts as done when its meta.json reads and its state file matches the recorded sha256 (checkpoints
from before the hash was recorded: a well-formed safetensors file of the size its header gives). A task that
fails the check is trained again from the previous task's checkpoint, with a warning naming the file; every
later load verifies the hash again. A non-finite loss stops the run with an error naming it, the task and the
step; that task's checkpoint is not written.

The fingerprint hashes the method, its settings, the seed, the concept sequence and the backbone's
weight files (size and mtime), so changed settings or a rebuilt backbone never resume from stale
checkpoints, and old checkpoints are kept, not deleted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..backbones.model import T2IModel
from ..data.datasets import PreparedDataset
from ..methods.base import T2IMethod, Task, build_settings
from ..methods.registry import get_method
from ..run_files import META, STATE, load_state, read_json, state_problem
from ..utils import UserError, atomic_write_json, config_hash, file_sha256, seed_everything, stable_seed

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ------------------------------------------------------------------------------------------- sequences
def task_sequence(ds: PreparedDataset, n_tasks: int, seed: int) -> list[str]:
    """The concepts of a run in order: a seeded draw of ``n_tasks`` of the dataset's concepts."""
    concepts = ds.concepts()
    if n_tasks > len(concepts):
        raise UserError(f"{ds.root}: n_tasks={n_tasks} but the dataset has only {len(concepts)} concepts")
    rng = np.random.default_rng(stable_seed("sequence", ds.name, seed))
    return [concepts[i] for i in rng.permutation(len(concepts))[:n_tasks]]


GENERIC = "generic"  # the dataset's concept name for images of the class without any concept


def class_captions(ds: PreparedDataset) -> list[str]:
    """The distinct captions of the dataset's generic-class images, in manifest order (text only)."""
    seen: dict[str, None] = {}
    for r in ds.records():
        if r.concept == GENERIC and r.caption:
            seen.setdefault(r.caption)
    return list(seen)


def make_tasks(ds: PreparedDataset, sequence: list[str], class_word: str, prompt_template: str,
               with_images: bool = False) -> list[Task]:
    tasks: list[Task] = []
    captions = class_captions(ds)
    for i, concept in enumerate(sequence, start=1):
        token = f"<v{i}>"
        images = ds.images(concept=concept, split="train") if with_images else torch.empty(0)
        tasks.append(Task(index=i, concept=concept, token=token, prompt=prompt_template.format(token=token),
                          images=images, class_word=class_word, past=list(tasks), class_captions=captions))
    return tasks


# ------------------------------------------------------------------------------------------- run spec
class RunSpec:
    """Everything that identifies one continual run (benchmark x n_tasks x method x seed)."""

    def __init__(self, *, backbone: str | Path, data_dir: str | Path, method: str, n_tasks: int, seed: int,
                 settings: dict | None = None, class_word: str = "", prompt_template: str = "a photo of {token}",
                 device: str = "auto"):
        self.backbone = Path(backbone)
        self.ds = PreparedDataset(data_dir)
        self.method_cls: type[T2IMethod] = get_method("t2i", method)
        self.settings = build_settings(self.method_cls.Settings, settings, f"method_settings.{method}")
        self.n_tasks = n_tasks
        self.seed = seed
        self.device = resolve_device(device)
        self.sequence = task_sequence(self.ds, n_tasks, seed)
        self.tasks = make_tasks(self.ds, self.sequence, class_word, prompt_template)

    def fingerprint(self) -> str:
        weights = sorted(p for p in self.backbone.rglob("*.safetensors"))
        ident = {"method": self.method_cls.name, "settings": self.settings.__dict__, "seed": self.seed,
                 "sequence": self.sequence,
                 "backbone": [(str(p.relative_to(self.backbone)), p.stat().st_size, p.stat().st_mtime_ns) for p in weights]}
        return config_hash(ident)

    def checkpoint_dir(self, ckpt_root: str | Path) -> Path:
        """This run's checkpoint folder under ``ckpt_root`` (created, with ``run.json``)."""
        d = Path(ckpt_root) / self.fingerprint()
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "run.json").exists():
            atomic_write_json(d / "run.json", {"method": self.method_cls.name, "settings": self.settings.__dict__,
                                               "seed": self.seed, "sequence": self.sequence,
                                               "backbone": str(self.backbone)})
        return d

    def name(self) -> str:
        """The run, as the result folders name it: ``<benchmark data>/T<n>/<method>/seed<s>``."""
        return f"{self.ds.name}/T{self.n_tasks}/{self.method_cls.name}/seed{self.seed}"

    def new_method(self) -> T2IMethod:
        model = T2IModel.from_pretrained(self.backbone, device=self.device)
        return self.method_cls(model, self.settings, seed=self.seed)

    def restore(self, ckpt_dir: Path, tasks_done: int) -> T2IMethod:
        """A method whose model is in the state after ``tasks_done`` tasks."""
        method = self.new_method()
        if tasks_done > 0:
            task_dir = ckpt_dir / f"task_{tasks_done:03d}"
            meta = read_json(task_dir / META)
            state = load_state(task_dir / STATE, meta.get("state_sha256"), device=self.device)
            method.load_state(state, self.tasks[:tasks_done])
        return method


# ------------------------------------------------------------------------------------------- training
def _done(ckpt_dir: Path, t: int) -> bool:
    return (ckpt_dir / f"task_{t:03d}" / "meta.json").is_file()


def finished_meta(ckpt_dir: Path, t: int) -> dict | None:
    """Task ``t``'s meta.json when the task is done and its checkpoint intact; None when it must be trained (a
    checkpoint that fails its check is reported with a warning naming the file)."""
    task_dir = ckpt_dir / f"task_{t:03d}"
    if not _done(ckpt_dir, t):
        return None
    try:
        meta = read_json(task_dir / META)
    except UserError as e:
        log.warning("%s; training task %d again", e, t)
        return None
    problem = state_problem(task_dir / STATE, meta.get("state_sha256"))
    if problem:
        log.warning("%s: corrupt checkpoint (%s); training task %d again from task %d", task_dir / STATE, problem,
                    t, t - 1)
        return None
    return meta


def train_one_task(method: T2IMethod, task: Task, seed: int) -> dict:
    """The loop: cached latents, AdamW over ``method.param_groups()``, autocast on GPU, grad accumulation."""
    s = method.settings
    model = method.model
    seed_everything(stable_seed("train", seed, task.index))
    g = torch.Generator().manual_seed(stable_seed("batches", seed, task.index))
    method.begin_task(task)
    images, prompts = method.training_data(task)
    if len(prompts) != len(images) or not len(images):
        raise ValueError(f"method {method.name}: training_data gave {len(images)} images and {len(prompts)} prompts "
                         f"for task {task.index}; expected the same number, at least one")
    prompts = list(prompts)
    if s.flip:
        images = torch.cat([images, images.flip(-1)])
        prompts = prompts + prompts
    mean, std = model.latent_dist(images)  # the VAE is frozen: encode each image once
    groups = method.param_groups()
    params = [p for grp in groups for p in grp["params"]]
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)
    use_amp = model.device.startswith("cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    losses = []
    t0 = time.time()
    bar = tqdm(range(s.steps), desc=f"{method.name} task {task.index} ({task.concept})", mininterval=5,
               disable=os.environ.get("CONTINUAL_BENCH_NO_TQDM") == "1")
    for step in bar:
        total = 0.0
        for _ in range(s.grad_accum):
            idx = torch.randint(0, len(images), (s.batch_size,), generator=g)
            batch = {"latents": model.sample_latents(mean[idx], std[idx], g), "images": images[idx],
                     "prompts": [prompts[i] for i in idx.tolist()], "generator": g, "task": task, "step": step}
            with amp():
                out = method.loss(batch)
            loss = out["loss"] / s.grad_accum
            if not torch.isfinite(loss):
                raise FloatingPointError(f"method {method.name}: non-finite loss {loss.item()} at task {task.index} "
                                         f"step {step} ({ {k: float(v) for k, v in out.items()} })")
            loss.backward()
            total += loss.item()
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    if not losses:
        raise FloatingPointError(f"method {method.name}: no training step at task {task.index} (steps={s.steps})")
    n_trained = method.n_trained()
    method.end_task(task)
    return {"task": task.index, "concept": task.concept, "token": task.token, "steps": s.steps,
            "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-25:])),
            "N_train": int(n_trained), "N_store": int(method.n_stored()), "seconds": round(time.time() - t0, 1)}


def _save_checkpoint(ckpt_dir: Path, t: int, method: T2IMethod, meta: dict) -> None:
    final = ckpt_dir / f"task_{t:03d}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".task_{t:03d}.", dir=ckpt_dir))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(tmp / STATE))
        meta["state_sha256"] = file_sha256(tmp / STATE)  # verified before the checkpoint is trusted again
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def train_sequence(spec: RunSpec, ckpt_root: str | Path) -> list[dict]:
    """Train every task of ``spec`` in order, skipping tasks that already have an intact checkpoint."""
    ckpt_dir = spec.checkpoint_dir(ckpt_root)
    metas = []
    for task in spec.tasks:
        t = task.index
        done = finished_meta(ckpt_dir, t)
        if done is not None:
            metas.append(done)
            log.info("task %d (%s): checkpoint found, skipping", t, task.concept)
            continue
        if t > 1:
            log.info("task %d: resuming from the checkpoint of task %d", t, t - 1)
        method = spec.restore(ckpt_dir, t - 1)
        size = method.model.image_size
        # past concepts' real images only for non-continual references (joint); continual methods never see them
        given = [task, *task.past] if method.uses_past_data else [task]
        try:
            for tk in given:
                tk.images = spec.ds.images(concept=tk.concept, split="train", size=size)
            meta = train_one_task(method, task, spec.seed)
        except FloatingPointError as e:  # nothing of this task is saved: a rerun starts it again
            raise FloatingPointError(f"run {spec.name()} ({ckpt_dir}): {e}; task {t} was not saved") from None
        finally:
            for tk in given:
                tk.images = torch.empty(0)
        log.info("task %d (%s): loss %.4f -> %.4f in %.1fs", t, task.concept, meta["loss_first"], meta["loss_last"],
                 meta["seconds"])
        _save_checkpoint(ckpt_dir, t, method, meta)
        metas.append(meta)
    return metas


def write_train_summary(spec: RunSpec, metas: list[dict], out: str | Path) -> None:
    """The run's manifest: the exact concept sequence drawn from the seed, tokens, prompts, per-task stats."""
    atomic_write_json(out, {"sequence": spec.sequence, "class_word": spec.tasks[0].class_word,
                            "dataset": str(spec.ds.root), "tokens": [t.token for t in spec.tasks],
                            "prompts": [t.prompt for t in spec.tasks], "method": spec.method_cls.name,
                            "settings": spec.settings.__dict__, "seed": spec.seed, "tasks": metas})
