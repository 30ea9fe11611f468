"""The small interface a class-incremental classification method fills (track ``cls``).

The engine (:mod:`continual_bench.engine.cls`) calls, for each task t (a new method object is built on
a freshly loaded backbone for every task and brought to the state after task t-1 by
:meth:`ClsMethod.load_state`, so a resumed run is bit-identical to an uninterrupted one)::

    method = Method(backbone, settings, seed, n_classes, n_tasks)   # frozen ViT as loaded from disk + a head
    method.load_state(state_after_t-1, tasks[:t-1])                 # skipped for t = 1
    method.begin_task(task)                                          # new prompts/adapters, snapshot a teacher...
    method.before_training(task, images)    # optional: one pass over the task's training images (InfLoRA's subspace)
    cache = method.precompute(views)        # optional: per-image features of the *frozen* backbone (queries)
    for epoch, batch: loss = method.loss(batch)['loss']             # the method's training objective
                      Adam over method.param_groups(), cosine schedule per epoch (CODA-P)
                      (no parameter in param_groups(): no optimizer, no step)
    method.after_training(task, images)     # optional: one pass after training (prototypes, Gram matrices...)
    method.end_task(task)                                            # freeze components, store the task's LoRA...
    state = method.state_dict()                                      # everything that rebuilds the model (safetensors)
    logits = method.logits(x, cache)                                 # evaluation (the engine slices seen classes)

Head outputs are positions in the run's class order (CODA-P): task t owns outputs ``[task.lo, task.hi)``,
the classes seen so far are ``[0, task.hi)``. The default :meth:`ClsMethod.loss` is cross-entropy over the
seen classes; with ``mask_past = True`` the past classes' logits are set to -inf first (CODA-P's prompt
learners and FT++: ``logits[:, :last_valid_out_dim] = -inf``), so only the current task's outputs compete
and past head rows get no gradient.

``images()`` (the two pass hooks) returns a fresh iterator of ``(x, y)`` batches over the current task's training
images, each image once, in a fixed order and without augmentation (``flip``/``none``: the stored image;
``rrc``: Resize + CenterCrop, the test transform), ``y`` = head positions, on the run's device. The engine calls
both hooks in eval mode, without gradients and under the run's autocast. A method that trains nothing in a task
(SimpleCIL; APER and RanPAC after their first task) returns no parameter from :meth:`ClsMethod.param_groups` and
builds its classifier in :meth:`ClsMethod.after_training`.

Hyper-parameters are a dataclass ``Settings`` (defaults = toy profile); the config's
``cls_method_settings.<name>`` overrides its fields; an unknown key is an error naming it
(:func:`continual_bench.methods.base.build_settings`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import setting


@dataclass
class ClsTrainSettings:
    """Training settings every classification method has (toy-profile defaults).

    CODA-P's paper profile: ``epochs=50, batch_size=128, lr=1e-3`` (Adam (0.9, 0.999), weight decay 0,
    optimizer reset every task, cosine ``lr * cos(99 pi e / (200 (K-1)))`` stepped per epoch).
    Toy profile: 15 epochs of batch 32 (toy_imagenet_r: 60 training images per class; measured on 5 tasks,
    seed 0: 5 epochs left every method under-trained, e.g. the upper bound at A_N 30 instead of 54).

    ``min_steps``: a floor on the optimizer steps of one task; when ``epochs`` passes give fewer, the task
    runs ``ceil(min_steps / batches_per_epoch)`` epochs instead (the cosine schedule spans them). 0 = off
    (the paper profile: CODA-P counts epochs only, and its 20-task ImageNet-R tasks still get ~470 steps of
    batch 128). Toy default 225 = what 15 epochs give a 5-task toy task (8 classes), so 5-task runs are
    unchanged while 10/20-task runs (4 / 2 classes per task: 120 / 60 steps) are no longer cut to a quarter
    of the training. Measured with 60 steps per task (20 tasks, seed 0): every method under-learned its
    new classes (accuracy on the newest task right after learning it: CODA-P 37 %, FT++ 43 %, against 70 % /
    84 % with 5 tasks), which is the toy's step budget, not the methods.

    ``val_fraction``: 0 (default) = train on the whole training split, evaluate on the test split. ``> 0``
    holds out ``round(val_fraction * n)`` images (at least one) of each class's *training* images, chosen by a
    fixed seed per class (:func:`continual_bench.data.cls_data.holdout_split`: the same images for every method,
    seed and setting), trains on the rest and evaluates on them instead of the test split, so a selection grid
    (``config/paper_clora_lambda.yaml``) never reads a test image. Its accuracies are validation numbers.

    ``precision`` (CUDA only; a CPU run is fp32 either way): ``"bf16"`` runs the forward pass under bf16
    autocast, with key matching, top-k selection, CODA-P's attention weights, the logits and C-LoRA's penalty
    computed in fp32 all the same (:func:`full_precision`); ``"fp32"`` switches autocast off, which is what
    CODA-P's code runs (REFERENCE.md sec. 6).
    """

    epochs: int = setting(15, "passes over a task's training images (paper profile: 50)", min=1)
    batch_size: int = setting(32, "images per step (paper profile: 128)", min=1)
    lr: float = setting(1e-3, "learning rate (Adam)", gt=0)
    weight_decay: float = setting(0.0, "Adam weight decay", min=0)
    max_grad_norm: float = setting(0.0, "gradient-norm clipping; 0: no clipping (CODA-P clips nothing)", min=0)
    schedule: str = setting("cosine", "'cosine' (CODA-P's CosineSchedule) or 'constant'", choices=("cosine", "constant"))
    min_steps: int = setting(225, "floor on steps per task (more epochs for small tasks); 0 = epochs only (paper)",
                             min=0)
    val_fraction: float = setting(0.0, "> 0: evaluate on this fraction of each class's TRAIN images, held out (grids)",
                                  min=0, lt=1)
    precision: str = setting("bf16", "CUDA: 'bf16' autocast around the backbone, or 'fp32' (CODA-P); CPU: fp32 always",
                             choices=("bf16", "fp32"))


@dataclass
class ClsTask:
    """One task of a class-incremental sequence."""

    index: int  # 1-based position in the sequence
    classes: list[int]  # dataset label ids of this task's classes, in head order
    lo: int  # first head output of this task
    hi: int  # one past its last head output; [0, hi) = every class seen so far
    n_tasks: int  # length of the whole sequence
    past: list["ClsTask"] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return self.hi - self.lo


class ClsMethod:
    """Base class of class-incremental classification methods (track ``cls``).

    Subclasses set ``paper``, document the equation they implement in their docstring, and fill the hooks.
    Every module a method owns goes into ``self.net`` (an ``nn.ModuleDict`` holding ``backbone`` and
    ``head``), so ``to``/``train``/``eval`` reach it. ``joint = True`` methods (the upper bound) are trained
    once on the union of all tasks.
    """

    name: ClassVar[str]
    track: ClassVar[str]
    paper: ClassVar[str] = ""
    Settings: ClassVar[type] = ClsTrainSettings
    mask_past: ClassVar[bool] = False  # past-class logits -inf in the training loss (FT++, prompt methods)
    joint: ClassVar[bool] = False  # train one task holding every class (offline upper bound)

    def __init__(self, backbone, settings, seed: int = 0, n_classes: int = 0, n_tasks: int = 1):
        self.backbone = backbone
        self.settings = settings
        self.seed = seed
        self.n_classes = n_classes
        self.n_tasks = n_tasks
        self.tasks_done = 0
        self.head = nn.Linear(backbone.embed_dim, n_classes)
        self.net = nn.ModuleDict({"backbone": backbone, "head": self.head})
        self.current: ClsTask | None = None

    # ---------------------------------------------------------------- module plumbing
    def to(self, device) -> "ClsMethod":
        self.net.to(device)
        return self

    def train(self, mode: bool = True) -> "ClsMethod":
        """Train/eval mode of every owned module (the frozen backbone too: it has no dropout by default)."""
        self.net.train(mode)
        return self

    def eval(self) -> "ClsMethod":
        return self.train(False)

    # ---------------------------------------------------------------- hooks a method overrides
    def begin_task(self, task: ClsTask) -> None:
        self.current = task

    def before_training(self, task: ClsTask, images) -> None:  # noqa: ARG002 - hook
        """After :meth:`begin_task`, before :meth:`param_groups`: ``images()`` iterates over the task's training
        images once (see the module docstring). Default: nothing."""

    def after_training(self, task: ClsTask, images) -> None:  # noqa: ARG002 - hook
        """After the last optimizer step (or none), before :meth:`end_task` and evaluation. Default: nothing."""

    def param_groups(self) -> list[dict]:
        """What the optimizer trains (default: the head only). No parameter at all: the task runs no step."""
        return [{"params": list(self.head.parameters())}]

    def features(self, x: torch.Tensor, cache: dict | None = None, train: bool = False) -> torch.Tensor:
        """The (B, D) feature the head reads (default: the backbone's class token)."""
        return self.backbone(x)

    def extra_loss(self, x, cache, train: bool):  # noqa: ARG002 - hook for methods with auxiliary terms
        return None

    def logits(self, x: torch.Tensor, cache: dict | None = None, train: bool = False) -> torch.Tensor:
        """(B, n_classes) fp32 logits over every head output (the engine and loss slice the seen ones)."""
        return head_logits(self.head, self.features(x, cache, train))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy over the seen classes (past ones masked when ``mask_past``). Must return ``loss``."""
        task: ClsTask = batch["task"]
        logits = self.logits(batch["x"], batch.get("cache"), train=True)[:, :task.hi]
        if self.mask_past and task.lo > 0:
            logits = mask_past_logits(logits, task.lo)
        out = {"ce": F.cross_entropy(logits, batch["y"])}
        out["loss"] = out["ce"]
        return out

    def end_task(self, task: ClsTask) -> None:
        self.tasks_done = task.index

    def precompute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image tensors computed once per task on fixed (un-augmented or flip) views and handed back as
        ``batch['cache']``. They must depend on the *frozen* backbone only (the engine reuses them for
        evaluation after every task). Default: nothing."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild the model after the tasks done so far (default: the head)."""
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[ClsTask]) -> None:
        """Bring the freshly built method to the state after ``tasks`` (default: load the head)."""
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        self.tasks_done = len(tasks)

    # ---------------------------------------------------------------- counts (N_train, N_store)
    def n_trained(self) -> int:
        """Parameters the optimizer updates in one task."""
        seen = set()
        n = 0
        for g in self.param_groups():
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n

    def n_stored(self) -> int:
        """Parameters stored after the tasks done (beyond the frozen pretrained backbone)."""
        return sum(v.numel() for v in self.state_dict().values() if v.dim() > 0)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "paper": self.paper, **dataclasses.asdict(self.settings)}


def full_precision(t: torch.Tensor):
    """A region with autocast off on ``t``'s device: what it computes stays fp32 when the engine runs the
    backbone under bf16 autocast (key matching, top-k selection, CODA-P's attention weights, logits, penalties;
    CODA-P computes all of them in fp32). Outside autocast (every CPU run) it changes nothing."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def head_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` in fp32, whatever precision the features were computed in."""
    with full_precision(features):
        return head(features.float())


def mask_past_logits(logits: torch.Tensor, lo: int) -> torch.Tensor:
    """``logits`` with columns ``[0, lo)`` set to -inf (CODA-P ``logits[:, :last_valid_out_dim] = -inf``);
    out of place, so the past outputs get exactly zero gradient."""
    return torch.cat([torch.full_like(logits[:, :lo], float("-inf")), logits[:, lo:]], dim=1)


def cosine_factor(epoch: int, epochs: int) -> float:
    """CODA-P's ``CosineSchedule``: ``cos(99 pi e / (200 (K-1)))`` for epoch e of K (1.0 when K == 1)."""
    import math

    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
