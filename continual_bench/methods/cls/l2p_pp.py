"""L2P++ (CODA-Prompt's strengthened L2P): a prompt pool with top-k key matching, prefix-tuning."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...utils import UserError
from .. import register
from ..base import setting
from ..cls_base import ClsTrainSettings
from .coda_p import LAYERS_PATTERN, parse_layers
from .prompting import PromptMethod, cosine_matrix, split_prefix, uniform_prompt


@dataclass
class L2PPPSettings(ClsTrainSettings):
    pool: int = setting(30, "prompt pool size", min=1)
    length: int = setting(20, "prompt length (split half keys, half values)", min=2, multiple_of=2)
    top_k: int = setting(5, "prompts chosen per image (at most pool)", min=1)
    layers: str = setting("0", "ViT blocks with prompts: CODA-P's L2P++ is shallow (layer 0); '0,1,2,3,4' gives its "
                          "'Deep L2P++'", pattern=LAYERS_PATTERN)
    key_weight: float = setting(1.0, "weight of the key-query matching loss (CODA-P adds it with weight 1)", min=0)
    key_loss: str = setting("per_sample", "'per_sample': each sample's own top-k keys (L2P eq. 5); 'coda_p': CODA-P's "
                            "code", choices=("per_sample", "coda_p"))

    def check(self, where: str) -> None:
        if self.top_k > self.pool:
            raise UserError(f"{where}.top_k: {self.top_k} is out of range; allowed: top_k <= pool ({self.pool})")


KEY_LOSSES = ("per_sample", "coda_p")


def key_matching_loss(cos: torch.Tensor, idx: torch.Tensor, form: str) -> torch.Tensor:
    """The matching loss on the (B, M) query-key cosines ``cos`` and the (B, k) selected keys ``idx``.

    ``per_sample`` (L2P eq. 5): ``sum_b sum_{j in topk(b)} (1 - cos[b, j])``, B x k terms.
    ``coda_p`` (CODA-P ``models/zoo.py``, ``(1 - cos_sim[:, k_idx]).sum()``): ``cos[:, idx]`` is B x B x k, so
    ``sum_b sum_b' sum_{j in topk(b')} (1 - cos[b, j])``: every query is pulled towards every key any sample
    of the batch selected.
    """
    if form == "per_sample":
        return (1.0 - cos.gather(1, idx)).sum()
    if form == "coda_p":
        return (1.0 - cos[:, idx]).sum()
    raise ValueError(f"key_loss must be one of {KEY_LOSSES}, got {form!r}")


def top_k_keys(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2P's query-key matching: indices (B, k) of the k keys most cosine-similar to each query, and the
    (B, k) similarities. The query is detached: the keys learn, the frozen query does not."""
    cos = cosine_matrix(q.detach(), keys)
    top = torch.topk(cos, k, dim=1)
    return top.indices, top.values


@register("cls", "l2p_pp")
class L2PPP(PromptMethod):
    """L2P++ as CODA-Prompt defines it (Smith et al., CVPR 2023, sec. 5; L2P: Wang et al., CVPR 2022, eq. 5).

    A pool of M = 30 prompts P_j (length 20) with keys k_j, per prompted layer (layer 0). Each image uses
    the top-k (k = 5) prompts by cos(q(x), k_j); their halves are concatenated as prefix keys / values
    (5 x 10 each). The matching loss pulls the chosen keys towards the queries, in one of two forms
    (``key_loss``, :func:`key_matching_loss`)::

        per_sample:  L = CE(masked past logits) + key_weight * sum_b sum_{j in topk(b)} (1 - cos(q(x_b), k_j))
        coda_p:      L = CE(masked past logits) + key_weight * sum_b sum_b' sum_{j in topk(b')} (1 - cos(q(x_b), k_j))

    ``coda_p`` is what CODA-P's code computes (``(1 - cos_sim[:, k_idx]).sum()`` indexes the B x M cosines with
    the B x k choices: a B x B x k block; REFERENCE.md sec. 6) and is the paper profile's setting, because
    CODA-P's L2P++ numbers come from that code. ``per_sample`` pairs each sample with its own choice, as L2P's
    eq. 5 states; it is the toy default (results/toy_cls ran with it). Differences from the original L2P that
    make it "++" (CODA-P): prefix-tuning instead of prompt-tuning, the class token instead of the prompt-token
    average as the head's input, past logits masked. The pool is shared by all tasks and stays trainable.
    Prompts and keys are initialized U[0, 1) as in CODA-P. Trained: pool, keys, head.
    """

    paper = "Smith et al., CVPR 2023 (L2P++); Wang et al., L2P, CVPR 2022"
    Settings = L2PPPSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        where = f"cls_method_settings.{getattr(self, 'name', 'l2p_pp')}"
        self.layers = parse_layers(settings.layers, backbone.depth, f"{where}.layers")
        if not 1 <= settings.top_k <= settings.pool:
            raise UserError(f"{where}.top_k must be in 1..pool ({settings.pool}), got {settings.top_k}")
        if settings.length < 2 or settings.length % 2:
            raise UserError(f"{where}.length must be even and >= 2, got {settings.length}")
        if settings.key_loss not in KEY_LOSSES:
            raise UserError(f"{where}.key_loss must be one of {', '.join(KEY_LOSSES)}, got {settings.key_loss!r}")
        D = backbone.embed_dim
        prompt = nn.Module()
        for l in self.layers:
            prompt.register_parameter(f"p_{l}", uniform_prompt(settings.pool, settings.length, D))
            prompt.register_parameter(f"k_{l}", uniform_prompt(settings.pool, D))
        self.net["prompt"] = prompt

    def prefixes(self, q, train):
        P = self.net["prompt"]
        B, D = len(q), self.backbone.embed_dim
        half = self.settings.length // 2
        out = {}
        for l in self.layers:
            cos = cosine_matrix(q.detach(), getattr(P, f"k_{l}"))  # fp32 (B, M); the query does not learn
            idx = torch.topk(cos, self.settings.top_k, dim=1).indices
            if train:
                self._aux.append(self.settings.key_weight * key_matching_loss(cos, idx, self.settings.key_loss))
            sel = getattr(P, f"p_{l}")[idx]  # (B, k, L, D)
            out[l] = (sel[:, :, :half].reshape(B, -1, D), sel[:, :, half:].reshape(B, -1, D))
        return out
