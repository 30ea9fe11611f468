"""LwF (Li & Hoiem, ECCV 2016 / TPAMI 2017): Learning without Forgetting, distillation on the old logits."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import register
from ..base import setting
from ..cls_base import head_logits, mask_past_logits
from .ft import FTSettings, FullFinetune


@dataclass
class LwFSettings(FTSettings):
    temperature: float = setting(2.0, "distillation temperature T (Li & Hoiem: 2)", gt=0)
    distill_weight: float = setting(1.0, "lambda_o, weight of the distillation loss (Li & Hoiem: 1)", min=0)


def lwf_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Li & Hoiem eq. 2: ``-(1/B) sum_b sum_c y'_c log yhat'_c`` with ``y' = softmax(z_teacher / T)``,
    ``yhat' = softmax(z_student / T)`` over the old classes (their ``y^(1/T)`` renormalized = softmax(z/T))."""
    target = F.softmax(teacher_logits / T, dim=1)
    return -(target * F.log_softmax(student_logits / T, dim=1)).sum(dim=1).mean()


@register("cls", "lwf")
class LwF(FullFinetune):
    """LwF (Li & Hoiem, "Learning without Forgetting", ECCV 2016, eqs. 1-2), class-incremental form.

    Before task t the model is copied as a frozen teacher. On the new task's images only::

        L = CE(f(x)[:, lo:hi], y) + lambda_o * L_old,
        L_old = -(1/B) sum_b sum_{c < lo} softmax(z^teacher_b / T)_c log softmax(z_b / T)_c,   T = 2, lambda_o = 1

    The new-task term covers the new classes' outputs only (LwF's new task head; here the past logits
    are masked as in FT++), the distillation keeps the old outputs' responses to new images close to the
    teacher's. Trained: ViT + head; the teacher is not stored (it is the previous checkpoint).
    """

    paper = "Li & Hoiem, Learning without Forgetting, ECCV 2016"
    Settings = LwFSettings
    mask_past = True

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        self.teacher = None

    def begin_task(self, task):
        super().begin_task(task)
        self.teacher = None
        if task.lo > 0:
            self.teacher = copy.deepcopy(torch.nn.ModuleDict({"backbone": self.backbone, "head": self.head}))
            self.teacher.requires_grad_(False)
            self.teacher.eval()

    def to(self, device):
        super().to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def loss(self, batch):
        task = batch["task"]
        x = batch["x"]
        logits = self.logits(x, train=True)[:, :task.hi]
        out = {"ce": F.cross_entropy(mask_past_logits(logits, task.lo) if task.lo > 0 else logits, batch["y"])}
        out["loss"] = out["ce"]
        if self.teacher is not None:
            with torch.no_grad():
                old = head_logits(self.teacher["head"], self.teacher["backbone"](x))[:, :task.lo]
            out["distill"] = lwf_distillation(logits[:, :task.lo], old, self.settings.temperature)
            out["loss"] = out["loss"] + self.settings.distill_weight * out["distill"]
        return out
