"""CODA-Prompt (Smith et al., CVPR 2023): decomposed, attention-weighted prompts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils import UserError
from .. import register
from ..base import setting
from ..cls_base import ClsTrainSettings, full_precision
from .prompting import PromptMethod, split_prefix


LAYERS_PATTERN = r" *(\d+ *(, *\d+ *)*)?"  # "0,1,2" (a Settings field's pattern; empty = no layer)


def parse_layers(text: str, depth: int, where: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; every layer must exist in the backbone."""
    try:
        layers = [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{where}: layers must be comma-separated integers, got {text!r}") from None
    bad = [v for v in layers if not 0 <= v < depth]
    if bad:
        raise UserError(f"{where}: layer(s) {bad} outside the backbone's 0..{depth - 1}")
    return layers


def gram_schmidt_(t: torch.Tensor, s: int, f: int) -> None:
    """CODA-P's ``gram_schmidt`` in place on rows of ``t`` (flattened to 2-D): rows ``[0, s)`` are kept, rows
    ``[s, f)`` become fresh N(0, 1) vectors minus their projections on every earlier row, normalized; rows
    ``[f, M)`` become zero. (Classical Gram-Schmidt, as CODA-P's code, against the *trained* earlier rows.)
    When the earlier rows already span the space (more components than dimensions, possible at toy widths),
    the fresh row stays a normalized random vector: it cannot be orthogonal, and CODA-P's loop has no answer."""
    flat = t.data.view(t.shape[0], -1)
    out = torch.zeros_like(flat)
    out[:s] = flat[:s]
    for k in range(s, f):
        v = torch.randn(flat.shape[1], dtype=flat.dtype, device=flat.device)
        u = v
        if k > 0:
            U = out[:k]
            denom = (U * U).sum(1)
            ok = denom > 1e-8
            coef = (U[ok] @ v) / denom[ok]
            u = v - coef @ U[ok]
        if u.norm() < 1e-4 * v.norm():
            u = v
        out[k] = u / u.norm()
    flat.copy_(out)


class CodaPromptPool(nn.Module):
    """Per layer l: components P_l (M, L, D), keys K_l (M, Dk), attention vectors A_l (M, Dk); ``M / T``
    components per task."""

    def __init__(self, embed_dim: int, key_dim: int, n_tasks: int, pool: int, length: int, layers: list[int]):
        super().__init__()
        if pool // n_tasks < 1:
            raise UserError(f"coda_p: pool {pool} is smaller than the {n_tasks} tasks (needs >= 1 component per task)")
        self.per_task = pool // n_tasks  # CODA-P: int(e_pool_size / n_tasks)
        self.layers = layers
        self.length = length
        for l in layers:
            self.register_parameter(f"p_{l}", nn.Parameter(torch.zeros(pool, length, embed_dim)))
            self.register_parameter(f"k_{l}", nn.Parameter(torch.zeros(pool, key_dim)))
            self.register_parameter(f"a_{l}", nn.Parameter(torch.zeros(pool, key_dim)))
        self.task_count = 0  # 0-based index of the task being learned / last learned

    def span(self, task_count: int) -> tuple[int, int]:
        return task_count * self.per_task, (task_count + 1) * self.per_task

    def init_task(self, task_count: int) -> None:
        """CODA-P ``process_task_count``: Gram-Schmidt (re-)init of the new task's components."""
        self.task_count = task_count
        s, f = self.span(task_count)
        with torch.no_grad():
            for l in self.layers:
                for name in ("k", "a", "p"):
                    gram_schmidt_(getattr(self, f"{name}_{l}"), s, f)

    def tensors(self, l: int, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, A, P) over components [0, f): past ones detached when training (frozen)."""
        s, f = self.span(self.task_count)
        K, A, P = getattr(self, f"k_{l}"), getattr(self, f"a_{l}"), getattr(self, f"p_{l}")
        if train and s > 0:
            return (torch.cat([K[:s].detach(), K[s:f]]), torch.cat([A[:s].detach(), A[s:f]]),
                    torch.cat([P[:s].detach(), P[s:f]]))
        if train:
            return K[s:f], A[s:f], P[s:f]
        return K[:f], A[:f], P[:f]

    @staticmethod
    def combine(q: torch.Tensor, K: torch.Tensor, A: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CODA-P eq. 3-5: alpha_m = cos(q ⊙ A_m, K_m); prompt = sum_m alpha_m P_m. Returns (prompt, alpha), both
        fp32 under any autocast (CODA-P computes them in fp32)."""
        with full_precision(P):
            aq = torch.einsum("bd,kd->bkd", q.float(), A.float())
            alpha = torch.einsum("bkd,kd->bk", F.normalize(aq, dim=2), F.normalize(K.float(), dim=1))
            return torch.einsum("bk,kld->bld", alpha, P.float()), alpha

    def ortho_penalty(self, l: int, train: bool) -> torch.Tensor:
        """CODA-P's ``ortho_penalty`` ``mean((T T^T - I)^2)`` summed over K, A and flattened P."""
        out = 0.0
        for t in self.tensors(l, train):
            t = t.reshape(t.shape[0], -1)
            out = out + ((t @ t.T - torch.eye(t.shape[0], device=t.device)) ** 2).mean()
        return out


@dataclass
class CodaSettings(ClsTrainSettings):
    pool: int = setting(100, "components M (CODA-P ImageNet-R: 100)", min=1)
    length: int = setting(8, "prompt length L (split half keys, half values: 8 = 4 + 4)", min=2, multiple_of=2)
    layers: str = setting("0,1,2,3,4", "ViT blocks that get prompts, comma-separated", pattern=LAYERS_PATTERN)
    ortho_mu: float = setting(0.0, "weight of the orthogonality penalty (CODA-P ImageNet-R config: 0)", min=0)


@register("cls", "coda_p")
class CodaP(PromptMethod):
    """CODA-Prompt (Smith et al., CVPR 2023, eqs. 3-5), as in CODA-Prompt's ``models/zoo.py`` (pinned commit).

    For each prompted layer l and query q(x) (frozen ViT class token, no grad)::

        alpha_m(x) = cos(q(x) ⊙ A_m, K_m)                 m = 1..M components (attention vector A_m, key K_m)
        p_l(x)     = sum_m alpha_m(x) P_m                 (L, D), split in halves: prefix keys / prefix values

    ``M / T`` components (with their keys and attention vectors) belong to each task: at task t the new
    slice is Gram-Schmidt-initialized against the earlier ones, the earlier slices are used but frozen
    (detached: their gradients are exactly zero), later slices are not used. At test time all components
    learned so far are used. Optional orthogonality penalty ``ortho_mu * sum ||T T^T - I||^2`` (0 here, as
    CODA-P's ImageNet-R setting). Trained: the current slice of P, K, A in every prompted layer, and the
    head; past-class logits are -inf in the loss. Defaults: pool 100, length 8, layers 0-4.
    """

    paper = "Smith et al., CODA-Prompt, CVPR 2023"
    Settings = CodaSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        layers = parse_layers(settings.layers, backbone.depth, "cls_method_settings.coda_p.layers")
        if settings.length < 2 or settings.length % 2:
            raise UserError(f"cls_method_settings.coda_p.length must be even and >= 2, got {settings.length}")
        self.net["prompt"] = CodaPromptPool(backbone.embed_dim, backbone.embed_dim, n_tasks, settings.pool,
                                            settings.length, layers)
        self.pool = self.net["prompt"]
        self.pool.init_task(0)

    def begin_task(self, task):
        super().begin_task(task)
        if task.index > 1:  # task 1's slice was initialized in __init__
            self.pool.init_task(task.index - 1)

    def prefixes(self, q, train):
        out = {}
        for l in self.pool.layers:
            K, A, P = self.pool.tensors(l, train)
            p, _ = self.pool.combine(q, K, A, P)
            out[l] = split_prefix(p)
            if train and self.settings.ortho_mu > 0:
                self._aux.append(self.settings.ortho_mu * self.pool.ortho_penalty(l, train))
        return out

    def load_state(self, state, tasks):
        super().load_state(state, tasks)
        self.pool.task_count = max(len(tasks) - 1, 0)

    def n_stored(self) -> int:
        """Head + the components of the tasks learned so far (later slices are zeros, not information)."""
        f = self.pool.span(max(self.tasks_done - 1, 0))[1]
        per = sum(getattr(self.pool, f"{n}_{l}")[0].numel() for l in self.pool.layers for n in ("k", "a", "p"))
        return sum(p.numel() for p in self.head.parameters()) + f * per
