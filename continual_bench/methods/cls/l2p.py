"""L2P (Wang et al., CVPR 2022): Learning to Prompt, a prompt pool with top-k query-key matching."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...utils import UserError
from .. import register
from ..base import setting
from ..cls_base import ClsTrainSettings
from .l2p_pp import top_k_keys
from .prompting import PromptMethod


@dataclass
class L2PSettings(ClsTrainSettings):
    pool: int = setting(10, "prompt pool size M", min=1)
    length: int = setting(5, "prompt length L_p", min=1)
    top_k: int = setting(5, "prompts chosen per image N (at most pool)", min=1)
    pull_weight: float = setting(0.1, "lambda of the surrogate loss (l2p-pytorch's pull_constraint_coeff)", min=0)

    def check(self, where: str) -> None:
        if self.top_k > self.pool:
            raise UserError(f"{where}.top_k: {self.top_k} is out of range; allowed: top_k <= pool ({self.pool})")


@register("cls", "l2p")
class L2P(PromptMethod):
    """L2P (Wang et al., CVPR 2022, eqs. 3-5), the original prompt-tuning form.

    A pool of M = 10 prompts P_j (L_p = 5 tokens each) with keys k_j, shared by all tasks. The query
    q(x) (frozen ViT class token) picks the N = 5 prompts with the most cosine-similar keys; their
    N x L_p tokens are inserted into the input sequence (after the class token, before the patches: prompt
    *tuning*, not prefix-tuning). The classifier reads the average of the final tokens at the prompt
    positions (L2P's "prompt" head). Loss (eq. 5)::

        L = CE(masked) + lambda * mean_b sum_{j in topk(b)} (1 - cos(q(x_b), k_j)),    lambda = 0.1

    with the logits of classes outside the current task masked (L2P's train mask = the past classes in
    class-incremental learning). Prompts and keys initialized U(-1, 1) (l2p-pytorch's defaults; the
    batch-wise prompt-frequency penalty of the paper's optional diversity term is not used). Trained:
    pool, keys, head.
    """

    paper = "Wang et al., Learning to Prompt (L2P), CVPR 2022"
    Settings = L2PSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        if not 1 <= settings.top_k <= settings.pool:
            raise UserError(f"cls_method_settings.l2p.top_k must be in 1..pool ({settings.pool}), got {settings.top_k}")
        D = backbone.embed_dim
        prompt = nn.Module()
        prompt.prompts = nn.Parameter(torch.empty(settings.pool, settings.length, D).uniform_(-1, 1))
        prompt.keys = nn.Parameter(torch.empty(settings.pool, D).uniform_(-1, 1))
        self.net["prompt"] = prompt

    def prompt_tokens(self, q: torch.Tensor, train: bool) -> torch.Tensor:
        P = self.net["prompt"]
        idx, sim = top_k_keys(q, P.keys, self.settings.top_k)
        if train:
            self._aux.append(self.settings.pull_weight * (1.0 - sim).sum(dim=1).mean())
        return P.prompts[idx].reshape(len(q), -1, self.backbone.embed_dim)  # (B, N * L_p, D)

    def features(self, x, cache=None, train=False):
        q = self.query(x, cache)
        tokens = self.prompt_tokens(q, train)
        out = self.backbone.forward_features(x, prompt_tokens=tokens)
        return out[:, 1:1 + tokens.shape[1]].mean(dim=1)
