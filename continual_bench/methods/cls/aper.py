"""APER / ADAM (Zhou et al., IJCV 2024): adapt the ViT on the first task, then prototypes of the adapted and the
frozen ViT concatenated. Also home of the first-task parameter-efficient tuning that RanPAC reuses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils import UserError
from .. import register
from ..base import setting
from ..cls_base import ClsMethod, ClsTrainSettings, full_precision
from .simplecil import ClassMeans, PrototypeHead

PETL_KINDS = ("adapter", "ssf")


# ------------------------------------------------------------------------------------------- PETL modules
class ParallelAdapter(nn.Module):
    """AdaptFormer's parallel bottleneck adapter as RevisitingCIL/RanPAC configure it (``ffn_option='parallel'``,
    ``ffn_adapter_layernorm_option='none'``, ``ffn_adapter_init_option='lora'``, ``ffn_adapter_scalar='0.1'``,
    dropout 0.1): ``a(x) = s * W_up dropout(ReLU(W_down x + b_down)) + s * b_up``, W_down Kaiming-uniform
    (a = sqrt 5), W_up and both biases zero (the adapted ViT starts equal to the frozen one)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale, self.p = scale, dropout
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), p=self.p, training=self.training)
        return self.up(h) * self.scale


def ssf_targets(vit: nn.Module) -> dict[str, nn.Module]:
    """The modules SSF scales and shifts (RanPAC's ``petl/vision_transformer_ssf.py``): the patch embedding, and in
    every block norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2; the final norm. Keyed by module name."""
    names = ["patch_embed"]
    for i in range(len(vit.blocks)):
        names += [f"blocks.{i}.{n}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    names.append("norm")
    return {n: vit.get_submodule(n) for n in names}


def _out_features(module: nn.Module, embed_dim: int) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return embed_dim  # LayerNorm, the patch embedding: (B, N, D)


class PETL(nn.Module):
    """Parameter-efficient modules attached to a frozen :class:`~continual_bench.backbones.vit.ViTBackbone` by
    forward hooks (the backbone's modules and state-dict keys stay as loaded); ``enabled = False`` gives the frozen
    ViT exactly (APER's second branch).

    * ``adapter``: one :class:`ParallelAdapter` per block, fed with the block's input to its MLP sub-layer (the
      residual stream after attention, *before* norm2, as AdaptFormer's parallel option) and added to the MLP's
      output: ``x <- x + MLP(LN2(x)) + a(x)``. (A forward pre-hook on ``norm2`` keeps x, a forward hook on ``mlp``
      adds ``a(x)``; equal to AdaptFormer's block when LayerScale and drop-path are identities, as in ViT-B/16.)
    * ``ssf``: SSF (Lian et al., NeurIPS 2022): ``y <- gamma ⊙ y + beta`` after every module of
      :func:`ssf_targets`, gamma ~ N(1, 0.02), beta ~ N(0, 0.02) (RanPAC's ``init_ssf_scale_shift``).
    """

    def __init__(self, backbone, kind: str, *, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if kind not in PETL_KINDS:
            raise UserError(f"unknown PETL kind {kind!r}; expected one of {PETL_KINDS}")
        self.kind = kind
        self.enabled = True
        self._handles = []
        vit = backbone.vit
        if kind == "adapter":
            self.adapters = nn.ModuleList(ParallelAdapter(backbone.embed_dim, bottleneck, scale, dropout)
                                          for _ in vit.blocks)
            for blk, ad in zip(vit.blocks, self.adapters):
                slot: dict = {}
                self._handles.append(blk.norm2.register_forward_pre_hook(self._keep_input(slot)))
                self._handles.append(blk.mlp.register_forward_hook(self._add_adapter(slot, ad)))
        else:
            targets = ssf_targets(vit)
            self.gamma = nn.ParameterDict()
            self.beta = nn.ParameterDict()
            for name, module in targets.items():
                key = name.replace(".", "_")
                d = _out_features(module, backbone.embed_dim)
                self.gamma[key] = nn.Parameter(torch.empty(d).normal_(1.0, 0.02))
                self.beta[key] = nn.Parameter(torch.empty(d).normal_(0.0, 0.02))
                self._handles.append(module.register_forward_hook(self._scale_shift(key)))

    # hooks (closures over self, so `enabled` switches every one of them)
    def _keep_input(self, slot):
        def hook(module, args):
            if self.enabled:
                slot["x"] = args[0]
        return hook

    def _add_adapter(self, slot, adapter):
        def hook(module, args, out):
            if not self.enabled:
                return None
            return out + adapter(slot.pop("x")).to(out.dtype)
        return hook

    def _scale_shift(self, key):
        def hook(module, args, out):
            if not self.enabled:
                return None
            return out * self.gamma[key].to(out.dtype) + self.beta[key].to(out.dtype)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class CosineTrainHead(nn.Module):
    """RevisitingCIL's ``CosineLinear`` for the first-task tuning: ``sigma * cos(f, w_c)`` with a learnable scale
    sigma (initialized to 1) and rows uniform in +-1/sqrt(D)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim)))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with full_precision(features):
            return self.sigma * (F.normalize(features.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T)


# ------------------------------------------------------------------------------------------- shared base
@dataclass
class FirstTaskPETLSettings(ClsTrainSettings):
    petl: str = setting("adapter", "PETL tuned on the first task: 'adapter' (AdaptFormer) or 'ssf'",
                        choices=PETL_KINDS)
    adapter_dim: int = setting(16, "adapter bottleneck width (RevisitingCIL/RanPAC ffn_num: 64 on ViT-B (768))", min=1)
    adapter_scale: float = setting(0.1, "adapter output scale s (AdaptFormer scalar in their configs: 0.1)", gt=0)
    adapter_dropout: float = setting(0.1, "dropout inside the adapter while training (their Adapter: 0.1)",
                                     min=0, lt=1)


class FirstTaskPETL(ClsMethod):
    """Shared machinery of APER and RanPAC (not registered): a PETL module (``settings.petl``; ``'none'`` = no
    tuning) attached to the frozen ViT and trained on the *first* task only, with a cosine head over that task's
    classes (cross-entropy, as ``_init_train`` of both authors' code); afterwards both are frozen and every task
    trains nothing. Subclasses build their classifier in :meth:`after_training`. State: the PETL parameters."""

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        backbone.requires_grad_(False)
        self.petl: PETL | None = None
        if settings.petl != "none":
            self.petl = PETL(backbone, settings.petl, bottleneck=settings.adapter_dim, scale=settings.adapter_scale,
                             dropout=settings.adapter_dropout)
            self.net["petl"] = self.petl
        self.train_head = CosineTrainHead(backbone.embed_dim, n_classes)
        self.net["train_head"] = self.train_head
        self.tuning = False

    def begin_task(self, task):
        super().begin_task(task)
        self.tuning = task.index == 1 and self.petl is not None

    def param_groups(self) -> list[dict]:
        if not self.tuning:
            return []  # after the first task nothing trains (and without PETL nothing ever does)
        return [{"params": list(self.petl.parameters()) + list(self.train_head.parameters())}]

    def adapted_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class token of the ViT with the PETL modules (the frozen ViT when there are none)."""
        return self.backbone(x)

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class token of the pretrained ViT, PETL modules switched off."""
        if self.petl is None:
            return self.backbone(x)
        self.petl.enabled = False
        try:
            return self.backbone(x)
        finally:
            self.petl.enabled = True

    def loss(self, batch):
        """First-task tuning: ``CE(sigma * cos(phi_adapted(x), w)[:, :hi], y)`` (task 1: ``lo = 0``)."""
        task = batch["task"]
        logits = self.train_head(self.adapted_features(batch["x"]))[:, :task.hi]
        ce = F.cross_entropy(logits, batch["y"])
        return {"ce": ce, "loss": ce}

    def end_task(self, task):
        self.tuning = False
        super().end_task(task)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"petl.{k}": v for k, v in self.petl.state_dict().items()} if self.petl is not None else {}

    def load_state(self, state, tasks) -> None:
        if self.petl is not None:
            self.petl.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("petl.")})
        self.tasks_done = len(tasks)

    def n_stored(self) -> int:
        return sum(p.numel() for p in self.petl.parameters()) if self.petl is not None else 0


# ------------------------------------------------------------------------------------------- APER
@dataclass
class APERSettings(FirstTaskPETLSettings):
    pass


@register("cls", "aper")
class APER(FirstTaskPETL):
    """APER, "AdaPt and mERge" (called ADAM in the arXiv versions; Zhou, Cai, Ye, Zhan, Liu, "Revisiting
    Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are All You Need", IJCV 2024,
    arXiv 2303.07338), with an AdaptFormer adapter (default) or SSF; equation numbers were not checked here.

    First task only: adapters in every block (``petl``) and a cosine head are trained with cross-entropy on the
    first task's classes; then everything is frozen. After every task (the first included) each new class c gets
    the prototype of the *concatenated* embedding of the pretrained ViT phi and the adapted ViT phi*::

        z(x)  = [phi(x), phi*(x)]                       (2D)
        p_c   = (1 / n_c) sum_{i: y_i = c} z(x_i)
        s_c(x) = cos(z(x), p_c)                         (cosine classifier, as SimpleCIL)

    Later tasks take no optimizer step. The adapter (``petl: adapter``) is AdaptFormer's parallel bottleneck
    (:class:`ParallelAdapter`, :class:`PETL`): ``x <- x + MLP(LN2(x)) + 0.1 * W_up ReLU(W_down x)`` in every block,
    bottleneck ``adapter_dim`` (their ImageNet-R config: 64), W_up zero at the start.

    Against the authors' code (github.com/zhoudw-zdw/RevisitingCIL at a2e6b71: ``models/aper_adapter.py``,
    ``convs/vision_transformer_adapter.py``, ``utils/inc_net.py`` ``MultiBranchCosineIncrementalNet``,
    ``exps/aper_adapter/imagenetr_*.json``): same adapter (placement, init, scale 0.1, dropout 0.1), same
    first-task-only tuning with a learnable-scale cosine head over the first task's classes, same order of the
    concatenation (pretrained first) and prototypes from the training images with the test transform. Differences:
    (1) the optimizer is the engine's Adam with CODA-P's cosine schedule (their SGD, momentum 0.9, lr 0.05, weight
    decay 0.005, batch 24, 20 epochs, cosine annealing to 0); (2) the adapter is attached with hooks to timm's fused
    qkv ViT (they split q/k/v into three linears: the same function); (3) backbone, inputs ([0, 1], no
    normalization), class order and split follow the CODA-P protocol (they use ``vit_base_patch16_224_in21k`` and
    their own ImageNet-R split); (4) ``petl: ssf`` is SSF as RanPAC's code places it (their ``aper_ssf`` variant
    was not compared line by line). VPT variants are not implemented. State: adapter (or SSF) parameters and the
    prototypes; the first-task cosine head is discarded as in their code.
    """

    paper = "Zhou et al., Revisiting Class-Incremental Learning with Pre-Trained Models (APER/ADAM), IJCV 2024"
    Settings = APERSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        self.head = PrototypeHead(n_classes, 2 * backbone.embed_dim)
        self.net["head"] = self.head

    def features(self, x, cache=None, train=False):
        """``z(x) = [phi(x), phi*(x)]``: pretrained ViT first, adapted ViT second (their ``convnets`` order)."""
        return torch.cat([self.frozen_features(x), self.adapted_features(x)], dim=1)

    def after_training(self, task, images) -> None:
        means = ClassMeans(task.lo, task.hi, self.head.weight.shape[1], device=self.head.weight.device)
        for x, y in images():
            means.add(self.features(x), y)
        self.head.weight[task.lo:task.hi] = means.means().to(self.head.weight)

    def state_dict(self):
        state = super().state_dict()
        state["head.weight"] = self.head.weight
        return state

    def load_state(self, state, tasks):
        super().load_state(state, tasks)
        self.head.weight.copy_(state["head.weight"])

    def n_stored(self) -> int:
        return super().n_stored() + self.head.n_filled()
