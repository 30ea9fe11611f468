"""RanPAC (McDonnell et al., NeurIPS 2023): random projection + ReLU of the ViT's features, Gram-matrix ridge head."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...utils import UserError, stable_seed
from .. import register
from ..base import setting
from ..cls_base import full_precision
from .aper import PETL_KINDS, FirstTaskPETL, FirstTaskPETLSettings


def ridge_solve(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """``W_o = (G + lam I)^{-1} C`` (M x K), solved (not inverted) in float64, as RanPAC's ``torch.linalg.solve``."""
    G64 = G.double()
    eye = torch.eye(G64.shape[0], dtype=torch.float64, device=G64.device)
    return torch.linalg.solve(G64 + lam * eye, C.double())


def select_ridge(H: torch.Tensor, Y: torch.Tensor, grid: list[float], n_fit: int) -> tuple[float, list[float]]:
    """RanPAC's ``optimise_ridge_parameter``: fit ``W = (H_f^T H_f + lam I)^{-1} H_f^T Y_f`` on the first ``n_fit``
    rows, score the mean squared error ``mean((H_v W - Y_v)^2)`` on the other rows, return the lambda of the
    smallest error (the first one on ties, as ``np.argmin``) and every error. A non-finite error counts as +inf."""
    H64, Y64 = H.double(), Y.double()
    Hf, Yf, Hv, Yv = H64[:n_fit], Y64[:n_fit], H64[n_fit:], Y64[n_fit:]
    G, C = Hf.T @ Hf, Hf.T @ Yf
    losses = []
    for lam in grid:
        W = ridge_solve(G, C, lam)
        err = float(((Hv @ W - Yv) ** 2).mean()) if len(Hv) else 0.0
        losses.append(err if math.isfinite(err) else math.inf)
    best = min(range(len(grid)), key=lambda i: (losses[i], i))
    return grid[best], losses


@dataclass
class RanPACSettings(FirstTaskPETLSettings):
    # RanPAC's ImageNet-R runs (args/imagenetr_publish.csv, row 7) tune SSF on the first task
    petl: str = setting("ssf", "first-task PETL: 'ssf' (RanPAC's ImageNet-R choice), 'adapter', or 'none' (no tuning)",
                        choices=PETL_KINDS + ("none",))
    rp_dim: int = setting(1000, "M, random-projection width (RanPAC: 10000 for ViT-B); 0 = no projection (their M=0)",
                          min=0)
    ridge: float = setting(0.0, "lambda of the ridge head; 0 = select it per task on a held-out split (RanPAC)", min=0)
    ridge_exp_min: int = setting(-8, "grid 10^k, smallest k (RanPAC: -8)", min=-30, max=30)
    ridge_exp_max: int = setting(8, "grid 10^k, largest k (RanPAC: 8)", min=-30, max=30)
    ridge_fit_fraction: float = setting(0.8, "share of the task's training images that fits each lambda (RanPAC: 0.8)",
                                        gt=0, lt=1)


@register("cls", "ranpac")
class RanPAC(FirstTaskPETL):
    """RanPAC (McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel, "RanPAC: Random Projections and Pre-trained
    Models for Continual Learning", NeurIPS 2023, arXiv 2307.02251): phase 1 (optional) tunes a PETL method on the
    first task; phase 2 replaces the head by a closed-form ridge classifier on randomly projected features. Equation
    numbers were not checked here; the equations are those of the paper's method as the authors' code computes them.

    With phi the (adapted) ViT's class token (D), a random matrix W (D x M, entries N(0, 1), drawn once) and the
    one-hot label y (K classes)::

        h(x) = ReLU(phi(x)^T W)                                  (M; M = rp_dim, no projection when 0)
        G   <- G + sum_{x in task t} h(x) h(x)^T                 (M x M, accumulated over tasks)
        C   <- C + sum_{x in task t} h(x) y^T                    (M x K)
        W_o  = (G + lambda I)^{-1} C,      s(x) = h(x)^T W_o

    G and C are sums over every image seen, so after the last task W_o is the ridge solution on all tasks' data
    (no forgetting in the head; the backbone is frozen after task 1). lambda: ``ridge = 0`` (default) selects it
    after every task as the authors' code does (``optimise_ridge_parameter``): on the *current* task's features
    only, W is fitted on a random 80 % (their loader is shuffled; here a permutation seeded by (seed, task)) for
    every lambda in 10^-8 .. 10^8 and the lambda with the smallest mean squared error on the other 20 % is used
    with the accumulated G and C. (Our reading of the paper's "cross-validation": exactly that held-out split,
    not k-fold.) ``ridge > 0`` fixes it.

    Phase 1 (``petl``): as APER (:class:`~continual_bench.methods.cls.aper.FirstTaskPETL`): SSF (default, the
    authors' ImageNet-R runs) or an AdaptFormer adapter plus a learnable-scale cosine head, trained with
    cross-entropy on the first task only; ``petl: none`` skips it (their ``ncm`` rows). Tasks after the first, and
    every task without PETL, take no optimizer step.

    Against the authors' code (github.com/RanPAC/RanPAC at 012927f: ``RanPAC.py``, ``inc_net.py``,
    ``petl/vision_transformer_ssf.py``, ``args/imagenetr_publish.csv``): same projection (``randn(D, M)``, ReLU),
    same G and C updates from the training images with the test transform, same lambda grid and 80/20 rule, same
    solve and logits (no feature normalization for ViTs). Differences: (1) the solves run in float64 (theirs in
    float32) and a lambda whose held-out error is not finite is never chosen (``np.argmin`` would pick a NaN);
    G is accumulated in float64 per task and stored in float32 (their G is float32 throughout); (2) phase 1 uses
    the engine's Adam and CODA-P's cosine schedule (theirs: SGD momentum 0.9, lr 0.01, weight decay 5e-4, batch
    48, 20 epochs, cosine annealing); (3) SSF is attached with hooks to timm's ViT (same positions); (4) backbone,
    inputs, class order and split follow the CODA-P protocol (their ImageNet-R rows use ``vit_base_patch16_224``
    and their own split). State: PETL parameters, W, G, C, W_o and lambda (G is M x M: 4e8 bytes at M = 10000).
    """

    paper = "McDonnell et al., RanPAC: Random Projections and Pre-trained Models for Continual Learning, NeurIPS 2023"
    Settings = RanPACSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        if settings.ridge_exp_min > settings.ridge_exp_max:
            raise UserError(f"cls_method_settings.ranpac: ridge_exp_min {settings.ridge_exp_min} > ridge_exp_max "
                            f"{settings.ridge_exp_max}")
        D = backbone.embed_dim
        M = settings.rp_dim or D
        self.rp_dim = M
        dev = backbone.device
        self.W_rand = torch.zeros(D, M, device=dev) if settings.rp_dim else None  # drawn after the first task
        self.G = torch.zeros(M, M, dtype=torch.float64, device=dev)
        self.C = torch.zeros(M, n_classes, dtype=torch.float64, device=dev)
        self.W_out = torch.zeros(M, n_classes, device=dev)
        self.lam = torch.zeros((), dtype=torch.float64)
        self.ready = False  # W_out holds a solution (after the first task)

    def to(self, device):
        super().to(device)
        for name in ("W_rand", "G", "C", "W_out"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # ------------------------------------------------------------------ the head
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``h = ReLU(phi^T W)`` in fp32 (``phi`` itself when ``rp_dim = 0``)."""
        with full_precision(features):
            f = features.float()
            return F.relu(f @ self.W_rand) if self.W_rand is not None else f

    def logits(self, x, cache=None, train=False):
        if train or not self.ready:  # first-task tuning: the cosine head (RanPAC's phase 1)
            return self.train_head(self.adapted_features(x))
        h = self.project(self.adapted_features(x))
        with full_precision(h):
            return h @ self.W_out

    def draw_projection(self) -> None:
        """RanPAC's ``setup_RP``: ``W_rand = randn(D, M)``, drawn once (after the first task's tuning), from a
        generator seeded by the run's seed."""
        if self.W_rand is None:
            return
        g = torch.Generator().manual_seed(stable_seed("ranpac-rp", self.seed))
        self.W_rand = torch.randn(self.W_rand.shape, generator=g).to(self.W_rand.device)

    def after_training(self, task, images) -> None:
        if task.index == 1:
            self.draw_projection()
        H, Y = [], []
        for x, y in images():
            H.append(self.project(self.adapted_features(x)).detach().double())
            Y.append(F.one_hot(y.long(), self.n_classes).double())
        H, Y = torch.cat(H), torch.cat(Y)
        with full_precision(H):
            self._fit(task, H, Y)

    def _fit(self, task, H: torch.Tensor, Y: torch.Tensor) -> None:
        """Accumulate G and C with the task's (H, Y) (float64), choose lambda, solve W_o."""
        self.G += H.T @ H
        self.C += H.T @ Y
        s = self.settings
        if s.ridge > 0:
            lam = s.ridge
        else:
            g = torch.Generator().manual_seed(stable_seed("ranpac-ridge", self.seed, task.index))
            perm = torch.randperm(len(H), generator=g).to(H.device)
            grid = [10.0 ** k for k in range(s.ridge_exp_min, s.ridge_exp_max + 1)]
            # only the current task's columns are non-zero; the other columns add zero error to every lambda
            cols = slice(task.lo, task.hi)
            lam, _ = select_ridge(H[perm], Y[perm][:, cols], grid, int(len(H) * s.ridge_fit_fraction))
        self.lam = torch.tensor(lam, dtype=torch.float64)
        self.W_out = ridge_solve(self.G, self.C, lam).float()
        self.ready = True

    # ------------------------------------------------------------------ state
    def state_dict(self):
        state = super().state_dict()
        state.update({"rp.G": self.G.float(), "rp.C": self.C.float(), "rp.W_out": self.W_out, "rp.lambda": self.lam})
        if self.W_rand is not None:
            state["rp.W_rand"] = self.W_rand
        return state

    def load_state(self, state, tasks):
        super().load_state(state, tasks)
        dev = self.G.device
        self.G = state["rp.G"].to(dev, torch.float64)
        self.C = state["rp.C"].to(dev, torch.float64)
        self.W_out = state["rp.W_out"].to(dev, torch.float32)
        self.lam = state["rp.lambda"].double().cpu()
        if self.W_rand is not None:
            self.W_rand = state["rp.W_rand"].to(dev, torch.float32)
        self.ready = len(tasks) > 0

    def n_stored(self) -> int:
        n = super().n_stored() + self.G.numel() + self.C.numel() + self.W_out.numel()
        return n + (self.W_rand.numel() if self.W_rand is not None else 0)
