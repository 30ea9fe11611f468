"""Shared machinery of the prompt methods (L2P, L2P++, DualPrompt, CODA-P); no method is registered here.

Query (CODA-Prompt ``models/zoo.py``): ``q(x)`` = class-token feature of a no-grad pass of the *frozen*
ViT. Because it depends only on the frozen backbone and the image, the engine computes it once per task
for every fixed training view (the toy profile augments with horizontal flips only, so each image has two
views) and once per run for the test images (:meth:`PromptMethod.precompute`); under random-resized-crop
augmentation (paper profile) no view repeats, and the query is computed on the fly in the same forward.

Prefix-tuning (CODA-P ``models/vit.py``): a layer's prompt ``p`` (B, L, D) is split in half, ``p[:, :L/2]``
prepended to that layer's attention keys and ``p[:, L/2:]`` to its values (after the qkv projection).
Only the prompts, their keys (and CODA-P's attention vectors) and the classifier head train; the past
classes' logits are -inf in the training loss (CODA-P ``learners/prompt.py``).

Precision: query-key cosines (hence top-k selection and the matching losses), CODA-P's attention weights and
the logits are computed in fp32 even under the engine's bf16 autocast (``full_precision``), as CODA-P's fp32
code computes them; only the backbone's own matmuls run in bf16 then.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cls_base import ClsMethod, full_precision, mask_past_logits


def split_prefix(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) -> keys ``p[:, :L//2]``, values ``p[:, L//2:]`` (CODA-P's Ek/Ev split)."""
    i = p.shape[1] // 2
    return p[:, :i], p[:, i:]


def uniform_prompt(*shape: int) -> nn.Parameter:
    """CODA-P's ``tensor_prompt`` without ortho: ``nn.init.uniform_`` (U[0, 1)), used by L2P and DualPrompt."""
    p = nn.Parameter(torch.empty(*shape))
    nn.init.uniform_(p)
    return p


def cosine_matrix(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, D) x (M, D) -> (B, M) cosine similarities, in fp32 under any autocast (CODA-P matches in fp32)."""
    with full_precision(keys):
        return F.normalize(q.float(), dim=1) @ F.normalize(keys.float(), dim=1).T


class PromptMethod(ClsMethod):
    """A frozen ViT read through per-layer prefixes chosen from the query; subclasses build ``prefixes``."""

    mask_past = True

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        backbone.requires_grad_(False)
        self._aux: list[torch.Tensor] = []  # auxiliary losses of the last training forward (key matching...)

    # the prompt modules live in self.prompt (an nn.Module registered in self.net by subclasses)
    def prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.net["prompt"].parameters())

    def param_groups(self) -> list[dict]:
        return [{"params": self.prompt_parameters() + list(self.head.parameters())}]

    def precompute(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"query": self.backbone.query(x)}

    def query(self, x: torch.Tensor, cache: dict | None) -> torch.Tensor:
        if cache is not None and "query" in cache:
            return cache["query"]
        return self.backbone.query(x)

    def prefixes(self, q: torch.Tensor, train: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def features(self, x, cache=None, train=False):
        q = self.query(x, cache)
        return self.backbone(x, prefix=self.prefixes(q, train))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        task = batch["task"]
        self._aux = []
        logits = self.logits(batch["x"], batch.get("cache"), train=True)[:, :task.hi]
        if task.lo > 0:
            logits = mask_past_logits(logits, task.lo)
        out = {"ce": F.cross_entropy(logits, batch["y"])}
        out["loss"] = out["ce"]
        if self._aux:
            out["prompt_loss"] = torch.stack([a.reshape(()) for a in self._aux]).sum()
            out["loss"] = out["loss"] + out["prompt_loss"]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"prompt.{k}": v for k, v in self.net["prompt"].state_dict().items()})
        return state

    def load_state(self, state, tasks) -> None:
        super().load_state(state, tasks)
        self.net["prompt"].load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("prompt.")})
