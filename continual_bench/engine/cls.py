"""The class-incremental training engine: one loop for every ``cls`` method, a checkpoint per task,
evaluation of every seen task after every task.

Protocol (CODA-Prompt, REFERENCE.md section 2): the class order is CODA-P's (seed 0 = label order,
seed s > 0 = ``random.seed(s); random.shuffle``), tasks are consecutive chunks, head output j = j-th class
of the order. Per task: a fresh Adam (betas 0.9/0.999) over ``method.param_groups()``, ``epochs`` passes
(more when ``min_steps`` asks: :func:`task_epochs`) over the task's training images in batches of
``batch_size`` (reshuffled every epoch, last partial batch kept), CODA-P's cosine schedule
``lr * cos(99 pi e / (200 (K-1)))`` stepped per epoch. On GPU the forward pass runs under bf16 autocast
(``precision: bf16``; matching, selection, CODA-P's weights, logits and penalties stay fp32 inside the methods)
or without it (``precision: fp32``, CODA-P's numerics). After task t every seen task i <= t is evaluated on its
test images with logits over all seen classes ``[0, hi_t)``: ``acc[t][i]`` = top-1 accuracy in percent (the row
is stored in the task's ``meta.json``). With ``val_fraction > 0`` a fixed per-class share of the *training*
images is held out and evaluated instead of the test images (:func:`~continual_bench.data.cls_data.holdout_split`;
``train.json`` says ``eval_split: val``), so selection grids never read the test split.
Joint methods (upper bound) train once on all classes and are evaluated per task. Before the first and after the
last optimizer step the method may read the task's training images once, un-augmented (``before_training`` /
``after_training``: prototypes, Gram matrices, input subspaces); a task whose ``param_groups()`` hold no parameter
runs no optimizer step (``epochs: 0`` and ``loss_first``/``loss_last`` null in its meta.json).

Augmentation (``augment``): ``flip`` (toy profile) = random horizontal flip; each image has two fixed
views, so ``method.precompute`` (frozen-backbone features such as prompt queries) runs once per task
over all views, and once per run over the test images. ``rrc`` (paper profile) = RandomResizedCrop +
flip for training, Resize(256 * size / 224) + CenterCrop for testing, images read from disk by a
DataLoader; nothing is cached. ``none`` = no augmentation.

Resume and checkpoints are the shared engine's (:mod:`.runner`): before every task the method is rebuilt from the
backbone on disk and the previous task's checkpoint, every task's randomness is seeded from (seed, task), and a
killed run continues at the first task without a checkpoint and produces the same accuracy matrix. This track keeps
only the last finished task's ``state.safetensors`` (every task's accuracies and predictions are in its
``meta.json``; ``predictions.npz``: :func:`predictions`); a resumed run starts from the latest task whose state
matches its recorded sha256 (from the first task when none does: earlier states are not kept), with a warning
naming the file.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..backbones.vit import load_vit
from ..data.cls_data import ClsDataset, Split, class_order, holdout_split, load_split_tensor, task_classes
from ..methods.base import build_settings
from ..methods.cls_base import ClsMethod, ClsTask, cosine_factor
from ..methods.registry import get_method
from ..utils import UserError, atomic_path, atomic_write_json, seed_everything, stable_seed
from .runner import BaseRunSpec, TaskLoop, amp_context, resolve_device, seed_task, train_sequence  # noqa: F401

AUGMENTS = ("flip", "rrc", "none")
PRECISIONS = ("bf16", "fp32")
log = logging.getLogger(__name__)
# Settings added after checkpoints existed, at the value that reproduces the code those checkpoints were written
# with: left out of the fingerprint, so an interrupted run started before they existed still resumes.
FINGERPRINT_NEUTRAL = {"val_fraction": 0.0, "precision": "bf16", "key_loss": "per_sample", "test_keys": "seen"}


def make_cls_tasks(order: list[int], n_tasks: int) -> list[ClsTask]:
    tasks: list[ClsTask] = []
    lo = 0
    for i, classes in enumerate(task_classes(order, n_tasks), start=1):
        tasks.append(ClsTask(index=i, classes=list(classes), lo=lo, hi=lo + len(classes), n_tasks=n_tasks,
                             past=list(tasks)))
        lo += len(classes)
    return tasks


class ClsRunSpec(BaseRunSpec):
    """Everything that identifies one class-incremental run (benchmark x n_tasks x method x seed)."""

    keep_states = False  # every task's accuracies are in its meta.json: only the last state is needed to resume

    def __init__(self, *, backbone: str | Path, data_dir: str | Path, method: str, n_tasks: int, seed: int,
                 settings: dict | None = None, device: str = "auto", backbone_name: str | None = None,
                 augment: str = "flip", image_size: int | None = None, workers: int = 0, eval_batch_size: int = 256):
        if augment not in AUGMENTS:
            raise UserError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.backbone = Path(backbone)
        self.backbone_name = backbone_name
        self.ds = ClsDataset(data_dir)
        self.method_cls: type[ClsMethod] = get_method("cls", method)
        self.settings = build_settings(self.method_cls.Settings, settings, f"cls_method_settings.{method}")
        if self.settings.epochs < 1 or self.settings.batch_size < 1 or self.settings.min_steps < 0:
            raise UserError(f"cls_method_settings.{method}: epochs and batch_size must be >= 1, min_steps >= 0")
        if not 0.0 <= self.settings.val_fraction < 1.0:
            raise UserError(f"cls_method_settings.{method}.val_fraction must be in [0, 1) (0 = off), "
                            f"got {self.settings.val_fraction!r}")
        if self.settings.precision not in PRECISIONS:
            raise UserError(f"cls_method_settings.{method}.precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {self.settings.precision!r}")
        self.n_tasks, self.seed, self.augment = n_tasks, seed, augment
        self.device = resolve_device(device)
        self.image_size = image_size
        self.workers = workers
        self.eval_batch_size = eval_batch_size
        self.order = class_order(self.ds.n_classes, seed)
        self.tasks = make_cls_tasks(self.order, n_tasks)
        self.position = np.empty(self.ds.n_classes, dtype=np.int64)  # label id -> head output
        self.position[np.asarray(self.order)] = np.arange(len(self.order))
        C = self.ds.n_classes
        self.train_tasks = ([ClsTask(index=1, classes=list(self.order), lo=0, hi=C, n_tasks=1)]
                            if self.method_cls.joint else self.tasks)

    # ------------------------------------------------------------------ identity
    @property
    def eval_split(self) -> str:
        """What evaluation reads: ``val`` (held out from the training images) or ``test``."""
        return "val" if self.settings.val_fraction > 0 else "test"

    def identity(self) -> dict:
        weights = [self.backbone] if self.backbone.is_file() else sorted(self.backbone.rglob("*.safetensors"))
        manifest = self.ds.root / "manifest.csv"
        settings = {k: v for k, v in self.settings.__dict__.items()
                    if not (k in FINGERPRINT_NEUTRAL and v == FINGERPRINT_NEUTRAL[k])}
        return {"method": self.method_cls.name, "settings": settings, "seed": self.seed,
                "order": self.order, "n_tasks": self.n_tasks, "augment": self.augment, "image_size": self.image_size,
                "backbone": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
                "data": (manifest.stat().st_size, manifest.stat().st_mtime_ns)}

    def run_info(self) -> dict:
        return {"method": self.method_cls.name, "settings": self.settings.__dict__, "seed": self.seed,
                "order": self.order, "n_tasks": self.n_tasks, "augment": self.augment, "backbone": str(self.backbone)}

    # ------------------------------------------------------------------ models
    def new_method(self) -> ClsMethod:
        bb = load_vit(self.backbone, self.backbone_name, device="cpu")
        if self.image_size is None:
            self.image_size = bb.img_size
        seed_everything(stable_seed("cls-init", self.method_cls.name, self.seed))  # heads, prompt pools
        method = self.method_cls(bb, self.settings, seed=self.seed, n_classes=self.ds.n_classes, n_tasks=self.n_tasks)
        return method.to(self.device)

    # ------------------------------------------------------------------ the engine's hooks
    def task_trainer(self):
        data = TaskData(self)  # held for the whole run: test features are computed once

        def train_and_evaluate(method: ClsMethod, task: ClsTask) -> dict:
            meta = train_one_task(method, task, data, self)
            eval_tasks = self.tasks if self.method_cls.joint else self.tasks[:task.index]
            meta["acc"], meta["pred"] = evaluate_seen(method, data, self, task.hi, eval_tasks)
            return meta

        return train_and_evaluate

    def result_note(self, meta: dict) -> str:
        return "; acc " + " ".join(f"{a:.1f}" for a in meta["acc"])


# ------------------------------------------------------------------------------------------- data
class TaskData:
    """Training and test images of a run, as positions in the class order.

    ``flip``/``none``: all images held in memory as uint8 (small datasets: the toy world);
    ``rrc``: image paths, decoded and augmented by a DataLoader."""

    def __init__(self, spec: ClsRunSpec):
        self.spec = spec
        self.in_memory = spec.augment in ("flip", "none")
        self.train: Split = spec.ds.split("train")
        if spec.settings.val_fraction > 0:  # evaluate on held-out training images; the test split is not read
            self.train, self.test = holdout_split(self.train, spec.settings.val_fraction,
                                                  f"cls_method_settings.{spec.method_cls.name}.val_fraction")
        else:
            self.test: Split = spec.ds.split("test")
        self._mem: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._test_cache: dict[int, dict] = {}

    def _tensor(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._mem:
            x, labels = load_split_tensor(self.train if split == "train" else self.test, size=self.spec.image_size)
            self._mem[split] = (x, torch.from_numpy(self.spec.position[labels.numpy()]))
        return self._mem[split]

    def indices(self, split: str, task: ClsTask) -> np.ndarray:
        labels = (self.train if split == "train" else self.test).labels
        pos = self.spec.position[labels]
        return np.nonzero((pos >= task.lo) & (pos < task.hi))[0]

    # ---------------------------------------------------------------- in memory
    def views(self, task: ClsTask) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's fixed training views as float [0, 1] (x2 with flips) and their head positions."""
        x, y = self._tensor("train")
        idx = torch.from_numpy(self.indices("train", task))
        xs, ys = x[idx].float() / 255, y[idx]
        if self.spec.augment == "flip":
            xs, ys = torch.cat([xs, xs.flip(-1)]), torch.cat([ys, ys])
        return xs, ys

    def test_tensor(self, task: ClsTask) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._tensor("test")
        idx = torch.from_numpy(self.indices("test", task))
        return x[idx].float() / 255, y[idx]

    def plain_batches(self, task: ClsTask, batch_size: int):
        """The task's training images once, in order and un-augmented (in memory: the stored images, no flip;
        ``rrc``: Resize + CenterCrop, the test transform), with their head positions: what
        :meth:`ClsMethod.before_training` / :meth:`ClsMethod.after_training` see."""
        if not self.in_memory:
            yield from self.loader(task, "train", None, batch_size, plain=True)
            return
        x, y = self._tensor("train")
        idx = torch.from_numpy(self.indices("train", task))
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            yield x[b].float() / 255, y[b]

    # ---------------------------------------------------------------- from disk (rrc)
    def loader(self, task: ClsTask, split: str, g: torch.Generator | None, batch_size: int, plain: bool = False):
        """``plain``: the training images in order with the test transform (a method's pass over them)."""
        from torch.utils.data import DataLoader, Dataset
        from torchvision import transforms as T

        size = self.spec.image_size
        augment = split == "train" and not plain
        tf = (T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]) if augment else
              T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor()]))
        src = self.train if split == "train" else self.test
        idx = self.indices(split, task)
        paths, pos = [src.paths[i] for i in idx], self.spec.position[src.labels[idx]]

        class _DS(Dataset):
            def __len__(self):
                return len(paths)

            def __getitem__(self, i):
                from PIL import Image

                with Image.open(paths[i]) as im:
                    return tf(im.convert("RGB")), int(pos[i])

        return DataLoader(_DS(), batch_size=batch_size, shuffle=augment, generator=g,
                          num_workers=self.spec.workers, drop_last=False, pin_memory=self.spec.device.startswith("cuda"))


def _batched(method_fn, x: torch.Tensor, device: str, bs: int) -> dict[str, torch.Tensor]:
    out: dict[str, list] = {}
    for i in range(0, len(x), bs):
        for k, v in method_fn(x[i:i + bs].to(device)).items():
            out.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- training
def task_epochs(epochs: int, min_steps: int, n_batches: int) -> int:
    """Epochs of one task: ``epochs``, raised until ``epochs * n_batches >= min_steps`` (0 = no floor)."""
    if min_steps <= 0 or n_batches <= 0:
        return epochs
    return max(epochs, -(-min_steps // n_batches))


def train_one_task(method: ClsMethod, task: ClsTask, data: TaskData, spec: ClsRunSpec) -> dict:
    """The track's loop: a fresh Adam over ``method.param_groups()``, epochs of shuffled batches (in memory with
    precomputed frozen-backbone features, or from a DataLoader), the cosine schedule stepped per epoch."""
    s = method.settings
    device = spec.device
    g = seed_task("cls-", spec.seed, task.index)
    amp = amp_context(device, s.precision)
    t0 = time.time()  # the task's seconds include the method's own passes and the precomputed features
    method.begin_task(task)
    method.to(device)

    def images():  # the task's training images once, un-augmented, for the method's own passes
        return ((x.to(device, non_blocking=True), y.to(device))
                for x, y in data.plain_batches(task, spec.eval_batch_size))

    method.eval()
    with torch.no_grad(), amp():
        method.before_training(task, images)
    groups = [grp for grp in method.param_groups() if grp["params"]]
    # nothing to train in this task (a prototype or closed-form classifier): no optimizer, no steps
    opt = torch.optim.Adam(groups, lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay) if groups else None
    if s.schedule not in ("cosine", "constant"):
        raise UserError(f"cls_method_settings.{method.name}.schedule: 'cosine' or 'constant', got {s.schedule!r}")
    method.train()
    if data.in_memory:
        xs, ys = data.views(task)
        n = len(xs) // (2 if spec.augment == "flip" else 1)
        cache = _batched(method.precompute, xs, device, spec.eval_batch_size)
        n_batches = -(-n // s.batch_size)
    else:
        loader = data.loader(task, "train", g, s.batch_size)
        n_batches = len(loader)
    epochs = task_epochs(s.epochs, s.min_steps, n_batches) if opt else 0
    factor = (lambda e: cosine_factor(e, epochs)) if s.schedule == "cosine" else (lambda e: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if opt else None
    loop = TaskLoop(method, task, opt, groups, device=device, precision=s.precision, max_grad_norm=s.max_grad_norm,
                    total_steps=epochs * n_batches, desc=f"{method.name} task {task.index}/{len(spec.train_tasks)}", started=t0)
    step = 0
    for epoch in range(epochs):
        if data.in_memory:
            perm = torch.randperm(n, generator=g)
            if spec.augment == "flip":
                perm = perm + n * (torch.rand(n, generator=g) < 0.5).long()
            batches = ((xs[b], ys[b], {k: v[b].to(device) for k, v in cache.items()})
                       for b in perm.split(s.batch_size))
        else:
            batches = ((x, y, None) for x, y in loader)
        for x, y, c in batches:
            batch = {"x": x.to(device, non_blocking=True), "y": y.to(device), "task": task, "step": step}
            if c:
                batch["cache"] = c
            loop.step([batch], f"epoch {epoch} step {step}")
            step += 1
        sched.step()
        loop.show_loss(n_batches)
    method.eval()
    with torch.no_grad(), amp():
        method.after_training(task, images)
    return {"task": task.index, "classes": task.classes, "epochs": epochs, "steps": step,
            **loop.finish(first=n_batches, last=n_batches)}


@torch.no_grad()
def evaluate_seen(method: ClsMethod, data: TaskData, spec: ClsRunSpec, hi: int,
                  eval_tasks: list[ClsTask]) -> tuple[list[float], list[list[int]]]:
    """Top-1 accuracy (%) on each of ``eval_tasks``' test images, logits over outputs ``[0, hi)``, and each
    image's predicted output (head position), in the order of :meth:`TaskData.indices`."""
    method.eval()
    amp = amp_context(spec.device, spec.settings.precision)
    accs, preds = [], []
    for task in eval_tasks:
        correct, total, pred = 0, 0, []
        if data.in_memory:
            x, y = data.test_tensor(task)
            if task.index not in data._test_cache:
                data._test_cache[task.index] = _batched(method.precompute, x, spec.device, spec.eval_batch_size)
            cache = data._test_cache[task.index]
            chunks = ((x[i:i + spec.eval_batch_size], y[i:i + spec.eval_batch_size],
                       {k: v[i:i + spec.eval_batch_size].to(spec.device) for k, v in cache.items()})
                      for i in range(0, len(x), spec.eval_batch_size))
        else:
            chunks = ((x, y, None) for x, y in data.loader(task, "test", None, spec.eval_batch_size))
        for x, y, c in chunks:
            with amp():
                logits = method.logits(x.to(spec.device), c or None)[:, :hi]
            p = logits.float().argmax(1).cpu()
            correct += int((p == y).sum())
            total += len(y)
            pred += p.tolist()
        if total == 0:
            raise UserError(f"{spec.ds.root}: no {spec.eval_split} images for task {task.index} (classes {task.classes})")
        accs.append(100.0 * correct / total)
        preds.append(pred)
    return accs, preds


def accuracy_matrix(spec: ClsRunSpec, metas: list[dict]) -> np.ndarray:
    """acc[t][i] (T x T, NaN above the diagonal; 0-based: row = after task t+1). A joint run fills only the
    last row (its one model, evaluated on every task)."""
    T = spec.n_tasks
    acc = np.full((T, T), np.nan)
    if spec.method_cls.joint:
        acc[T - 1, :] = metas[0]["acc"]
    else:
        for m in metas:
            acc[m["task"] - 1, :len(m["acc"])] = m["acc"]
    return acc


def write_train_summary(spec: ClsRunSpec, metas: list[dict], out: str | Path) -> None:
    """``train.json``: the run's protocol and every task's meta.json, less the predictions (``predictions.npz``)."""
    atomic_write_json(out, {"method": spec.method_cls.name, "settings": spec.settings.__dict__, "seed": spec.seed,
                            "order": spec.order, "tasks": [t.classes for t in spec.tasks], "joint": spec.method_cls.joint,
                            "augment": spec.augment, "eval_split": spec.eval_split, "backbone": str(spec.backbone),
                            "train": [{k: v for k, v in m.items() if k != "pred"} for m in metas]})


def predictions(spec: ClsRunSpec, metas: list[dict]) -> dict[str, np.ndarray]:
    """Every evaluated image's predicted class after every task, as arrays (the contents of ``predictions.npz``).

    Columns are the evaluated images of tasks 1..T in task order (the order :func:`evaluate_seen` reads them):
    ``label`` (true head position), ``task`` (1-based), ``image`` (index into the evaluated split: the test split,
    or the held-out training images with ``val_fraction``); ``pred[t, j]`` = head position predicted for image ``j``
    after task ``t + 1`` (-1: not evaluated then; a joint run fills only the last row, as in
    :func:`accuracy_matrix`); ``classes[p]`` = class id of head position ``p``. ``acc[t][i]`` is the mean of
    ``pred[t] == label`` over task ``i``'s columns. Tasks whose meta.json predates predictions (checkpoints written
    before 2026-12-02) leave their row at -1, with a warning."""
    data = TaskData(spec)
    idx = [data.indices("test", t) for t in spec.tasks]
    image = np.concatenate(idx).astype(np.int64)
    label = spec.position[data.test.labels[image]].astype(np.int16)
    task = np.concatenate([np.full(len(i), t.index, dtype=np.int16) for t, i in zip(spec.tasks, idx)])
    pred = np.full((spec.n_tasks, len(image)), -1, dtype=np.int16)
    rows = [(spec.n_tasks, metas[0])] if spec.method_cls.joint else [(m["task"], m) for m in metas]
    missing = []
    for row, m in rows:
        if "pred" not in m:
            missing.append(m.get("task", row))
            continue
        flat = np.concatenate(m["pred"]).astype(np.int16)  # the evaluated tasks 1.. in order (evaluate_seen)
        pred[row - 1, :len(flat)] = flat
    if missing:
        log.warning("%s: tasks %s were evaluated before predictions were recorded: their rows of predictions.npz "
                    "are -1 (delete the run's checkpoints to evaluate them again)", spec.method_cls.name, missing)
    return {"pred": pred, "label": label, "task": task, "image": image,
            "classes": np.asarray(spec.order, dtype=np.int64), "split": np.asarray(spec.eval_split)}


def write_predictions(spec: ClsRunSpec, metas: list[dict], out: str | Path) -> None:
    """``predictions.npz`` (:func:`predictions`), written atomically."""
    arrays = predictions(spec, metas)
    with atomic_path(out) as tmp:
        np.savez_compressed(tmp, **arrays)
