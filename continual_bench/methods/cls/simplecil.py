"""SimpleCIL (Zhou et al., IJCV 2024): class-mean prototypes of the frozen backbone, cosine classifier."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import register
from ..cls_base import ClsMethod, ClsTrainSettings, full_precision


@dataclass
class SimpleCILSettings(ClsTrainSettings):
    """SimpleCIL has no hyper-parameter of its own and trains nothing: the inherited training fields (epochs, lr,
    batch size...) are accepted so that one ``cls_train`` block fits every method, and are not used (no optimizer
    step is taken)."""


class ClassMeans:
    """Running per-class sums of features for head outputs ``[lo, hi)``: ``mean_c = (1/n_c) sum_{y_i = c} f_i``
    (accumulated in float64, so the result does not depend on the batching)."""

    def __init__(self, lo: int, hi: int, dim: int, device=None):
        self.lo, self.hi = lo, hi
        self.sums = torch.zeros(hi - lo, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(hi - lo, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor, y: torch.Tensor) -> None:
        with full_precision(features):
            idx = (y - self.lo).long()
            if bool(((idx < 0) | (idx >= self.hi - self.lo)).any()):
                raise ValueError(f"labels outside the task's outputs [{self.lo}, {self.hi})")
            self.sums.index_add_(0, idx, features.detach().double())
            self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def means(self) -> torch.Tensor:
        if bool((self.counts == 0).any()):
            missing = (self.counts == 0).nonzero().flatten().add(self.lo).tolist()
            raise ValueError(f"no training image for head output(s) {missing}")
        return (self.sums / self.counts[:, None]).float()


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``s_c(x) = cos(f(x), p_c) = f(x)^T p_c / (|f(x)| |p_c|)`` (fp32 under any autocast); an all-zero prototype
    (a class not seen yet) scores 0."""
    with full_precision(features):
        return F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T


class PrototypeHead(nn.Module):
    """A cosine classifier whose rows are prototypes (a buffer: never trained). RevisitingCIL's ``CosineLinear``
    multiplies by a scale ``sigma`` (1, untrained here), which does not change the argmax."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_classes, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight)

    def n_filled(self) -> int:
        """Prototype entries set so far (rows of classes seen)."""
        return int((self.weight.abs().sum(1) > 0).sum()) * self.weight.shape[1]


@register("cls", "simplecil")
class SimpleCIL(ClsMethod):
    """SimpleCIL (Zhou, Cai, Ye, Zhan, Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models:
    Generalizability and Adaptivity are All You Need", IJCV 2024, arXiv 2303.07338: the prototype classifier that
    "continually sets the classifiers of PTM to prototype features"; equation numbers were not checked here).

    The pretrained ViT stays frozen and nothing is trained. After each task the classifier row of every new class c
    is set to its prototype, the mean class-token feature of its training images::

        p_c = (1 / n_c) sum_{i: y_i = c} phi(x_i)          phi = frozen ViT, class token after the final norm
        s_c(x) = cos(phi(x), p_c),    y_hat = argmax_{c seen} s_c(x)

    Rows of earlier classes never change, so the only forgetting is the growing number of competitors. The floor
    every trained method must beat. The engine runs no optimizer step (``param_groups`` is empty); the prototypes are
    computed in :meth:`after_training` on the task's training images without augmentation.

    Against the authors' code (github.com/zhoudw-zdw/RevisitingCIL, ``models/simplecil.py``, read at commit
    a2e6b71): the same prototypes (mean of un-normalized features of the training images with the *test*
    transform) and the same cosine classifier (``CosineLinear``, scale sigma = 1). Differences: the backbone is the
    protocol's timm ``vit_base_patch16_224.augreg_in21k_ft_in1k`` with inputs in [0, 1] and no mean/std
    normalization (CODA-P's protocol; the authors use ``vit_base_patch16_224_in21k`` with their loader's
    normalization), and the class order and split are CODA-P's, not theirs. Means are accumulated in float64.
    State: the prototypes (one row per class, zeros for classes not seen yet).
    """

    paper = "Zhou et al., Revisiting Class-Incremental Learning with Pre-Trained Models (SimpleCIL), IJCV 2024"
    Settings = SimpleCILSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        backbone.requires_grad_(False)
        self.head = PrototypeHead(n_classes, backbone.embed_dim)
        self.net["head"] = self.head

    def param_groups(self) -> list[dict]:
        return []  # nothing trains: the engine takes no optimizer step

    def after_training(self, task, images) -> None:
        means = ClassMeans(task.lo, task.hi, self.head.weight.shape[1], device=self.head.weight.device)
        for x, y in images():
            means.add(self.features(x), y)
        self.head.weight[task.lo:task.hi] = means.means().to(self.head.weight)

    def n_stored(self) -> int:
        return self.head.n_filled()
