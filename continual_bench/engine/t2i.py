"""The text-to-image training engine: the track's part of the shared engine (:mod:`.runner`).

What is shared (run fingerprint, checkpoint folder with sha256 checks, resume, the task loop, the optimizer step,
the non-finite-loss stop, progress) lives in :mod:`.runner`; this module holds what the text-to-image track does
differently: the concept sequence drawn from the seed and its tasks (token, prompt), the backbone loaded as a
:class:`~continual_bench.backbones.model.T2IModel`, and one task's training on cached VAE latents with AdamW and
gradient accumulation. Every task's state is kept (``task_<t>/state.safetensors``): evaluation samples the model
after every task, and a task whose state fails its sha256 check is trained again from the task before.

The fingerprint hashes the method, its settings, the seed, the concept sequence and the backbone's weight files
(size and mtime), so changed settings or a rebuilt backbone never resume from stale checkpoints, and old
checkpoints are kept, not deleted. Runs that differ only in length share their leading states
(:meth:`RunSpec.reusable_prefix`): sequences are drawn as a seeded permutation cut to ``n_tasks``, so the 5-task
sequence is the first five concepts of the 20-task one.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..backbones.model import T2IModel
from ..data.datasets import PreparedDataset
from ..methods.base import T2IMethod, Task, build_settings
from ..methods.registry import get_method
from ..utils import UserError, atomic_write_json, config_hash, file_sha256, stable_seed, weights_fingerprint
from .runner import BaseRunSpec, TaskLoop, resolve_device, seed_task, train_sequence  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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
class RunSpec(BaseRunSpec):
    """Everything that identifies one continual text-to-image run (benchmark x n_tasks x method x seed)."""

    keep_states = True  # evaluation samples the model after every task

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
        self.train_tasks = self.tasks

    def identity(self, sequence: list[str] | None = None) -> dict:
        """What the fingerprint hashes (``sequence``: another concept sequence in place of this run's)."""
        weights = sorted(p for p in self.backbone.rglob("*.safetensors"))
        return {"method": self.method_cls.name, "settings": self.settings.__dict__, "seed": self.seed,
                "sequence": self.sequence if sequence is None else sequence,
                "backbone": [(str(p.relative_to(self.backbone)), p.stat().st_size, p.stat().st_mtime_ns) for p in weights]}

    @functools.cached_property
    def data_record(self) -> dict:
        """The dataset as trained on: its manifest's sha256 and mtime (a re-prepared dataset rewrites it); read once
        per run, however many runs are asked whether they lend states."""
        manifest = self.ds.root / "manifest.csv"
        return {"manifest_sha256": file_sha256(manifest), "manifest_mtime_ns": manifest.stat().st_mtime_ns}

    def run_info(self) -> dict:
        return {"method": self.method_cls.name, "settings": self.settings.__dict__, "seed": self.seed,
                "sequence": self.sequence, "backbone": str(self.backbone), "data": self.data_record}

    def reusable_prefix(self, folder: Path) -> int:
        """The leading concepts this run shares with the run whose checkpoint folder is ``folder``, when that run is
        this one but for its sequence: its folder name is the fingerprint of this run's identity with its sequence
        (same method, settings, seed and backbone files), and its ``run.json`` records the same dataset (runs from
        before the record was kept, 2026-12-02, are matched on the rest and logged). 0 otherwise."""
        try:
            info = json.loads((Path(folder) / "run.json").read_text())
        except (OSError, ValueError):
            return 0
        seq = info.get("sequence") if isinstance(info, dict) else None
        if not isinstance(seq, list) or Path(folder).name != config_hash(self.identity(seq)):
            return 0
        if "data" not in info:
            log.info("%s: records no dataset; matched on method, settings, seed, backbone and sequence", folder)
        elif info["data"] != self.data_record:
            return 0
        k = 0
        while k < min(len(seq), len(self.sequence)) and seq[k] == self.sequence[k]:
            k += 1
        return k

    def new_method(self) -> T2IMethod:
        model = T2IModel.from_pretrained(self.backbone, device=self.device)
        return self.method_cls(model, self.settings, seed=self.seed)

    def task_label(self, task: Task) -> str:
        return f"{task.index} ({task.concept})"

    def task_trainer(self):
        return self.train_task

    def train_task(self, method: T2IMethod, task: Task) -> dict:
        """Load the task's real images (and past concepts' only for non-continual references: joint; continual
        methods never see them), train, and empty them again."""
        given = [task, *task.past] if method.uses_past_data else [task]
        try:
            for tk in given:
                tk.images = self.ds.images(concept=tk.concept, split="train", size=method.model.image_size)
            return train_one_task(method, task, self.seed)
        finally:
            for tk in given:
                tk.images = torch.empty(0)


# ------------------------------------------------------------------------------------------- training
def train_one_task(method: T2IMethod, task: Task, seed: int) -> dict:
    """The track's loop: cached latents, AdamW over ``method.param_groups()``, autocast on GPU, grad accumulation."""
    s = method.settings
    model = method.model
    g = seed_task("", seed, task.index)
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
    loop = TaskLoop(method, task, torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay), groups,
                    device=model.device, max_grad_norm=s.max_grad_norm, total_steps=s.steps,
                    desc=f"{method.name} task {task.index} ({task.concept})")

    def batch(step: int) -> dict:
        idx = torch.randint(0, len(images), (s.batch_size,), generator=g)
        return {"latents": model.sample_latents(mean[idx], std[idx], g), "images": images[idx],
                "prompts": [prompts[i] for i in idx.tolist()], "generator": g, "task": task, "step": step}

    for step in range(s.steps):  # each micro-batch is drawn right before its forward pass (one generator)
        loop.step((batch(step) for _ in range(s.grad_accum)), f"step {step}", accum=s.grad_accum)
        if step % 25 == 0:
            loop.show_loss(25)
    return {"task": task.index, "concept": task.concept, "token": task.token, "steps": s.steps,
            **loop.finish(first=10, last=25)}


def write_train_summary(spec: RunSpec, metas: list[dict], out: str | Path) -> None:
    """The run's manifest: the exact concept sequence drawn from the seed, tokens, prompts, per-task stats, and the
    backbone's weights fingerprint (``backbone_weights``; ``evaluate`` carries it into the result rows)."""
    atomic_write_json(out, {"sequence": spec.sequence, "class_word": spec.tasks[0].class_word,
                            "dataset": str(spec.ds.root), "tokens": [t.token for t in spec.tasks],
                            "prompts": [t.prompt for t in spec.tasks], "method": spec.method_cls.name,
                            "settings": spec.settings.__dict__, "seed": spec.seed, "tasks": metas,
                            "backbone_weights": weights_fingerprint(spec.backbone)})
