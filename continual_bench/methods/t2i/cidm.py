"""CIDM: per-concept LoRAs with a concept consolidation loss, aggregated at inference by elastic weights.

Paper: Dong, Liang, Wang, Sun, Liu, Zhang, "How to Continually Adapt Text-to-Image Diffusion Models for Flexible
Customization?", NeurIPS 2024 (arXiv 2410.17594). The paper's equations were not available here; every equation
below is read from the authors' code, github.com/JiahuaDong/CIFC (commit 9819aa8): ``lib/pipelines/
trainer_edlora.py`` (``EDLoRATrainer.forward``: the loss), ``lib/models/edlora.py`` (``LagrangeTerm``,
``MultiLoRALinearLayer``, ``EDLoRA_FusionAttnProcessor``: the aggregation), ``train.py`` (``--orthogonal 0.1``),
``inference.py`` (``--alpha 0.8``) and ``options/cidm/task_*.yml``.

Training (task t): a fresh LoRA (A_t, B_t) on the BASE weights (never on earlier concepts' LoRAs) of the
cross-attention's projections (their code: every Linear of ``attn2``: to_q, to_k, to_v, to_out.0), the concept
token's row trained with it, and the loss

    L = L_diffusion + lam_spec * L_orth + lam_enh * L_enh,
    L_orth = mean_{i<t, l} mean_{p,q} | (B_t^l B_i^l^T)_{pq} |      (task-specific knowledge: new vs old B's),
    L_enh  = mean_{i<t, l} mean (B_t^l - 1)^2                          (their "enhan" term, the same weight),

over the adapted layers l and finished tasks i (B = peft's lora_B = their lora_up, out x r); both vanish for
task 1. Aggregation at inference (elastic weight aggregation, EWA): for a prompt with text features h (its
encoder rows, padding included, as their processor sees them) and the learned concepts' token features c_k
(the concept tokens encoded together, one row per concept, as their ``encode_prompt`` of all concepts' names),

    s_k = max_i cos(c_k, h_i),     gamma_k = s_k^p / sum_j |s_j^p|   (p = 4),
    W(prompt) = W_0 + alpha * sum_k gamma_k s B_k A_k                 (alpha = 0.8, their inference default).

Implemented / simplified / left out (and why):
- Implemented: the per-concept LoRAs, L_orth and L_enh as the code computes them, EWA as above.
- Task-shared knowledge: the paper's consolidation loss also has a task-shared part; the code's ``LagrangeTerm``
  (B_t^T ~ Phi_t S with a shared basis S, updated by an ADMM-like ``lag_backward``) is constructed nowhere and its
  loss is commented out in ``EDLoRATrainer.forward``, so the released code trains without it. Left out here too
  (the paper's own formulation could not be read to implement it otherwise).
- Simplified: their layer-wise EDLoRA embeddings (16 token rows per concept, one per cross-attention layer) and
  per-layer EWA weights become one token row per concept and one gamma per prompt; the text-encoder LoRA (rank 4,
  lr 1e-5) and the attention-mask regularizer (``attn_reg_weight``) are not trained (this suite's token protocol:
  one new random row, "a photo of <vk>", no class word).
- Context-controllable synthesis (region features and region noise for several concepts in one image) is not
  implemented: every evaluation prompt here names one concept (or none: the generic prompt, to which EWA applies
  as in their code, which aggregates for every prompt).
N_store = T x (one LoRA + one row), as ``lora_per_concept``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import lora
from ..base import Task, setting
from ..registry import register
from .lora_per_concept import LoRAPerConcept, LoRAPerConceptSettings

#: every Linear of the cross-attention (the authors' code); ``cross_kv``: C-LoRA's key/value only
CIDM_TARGETS = {"cross_attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
                "cross_kv": ["attn2.to_k", "attn2.to_v"]}


@dataclass
class CIDMSettings(LoRAPerConceptSettings):
    # toy: lora_per_concept's (rank 4, lr 5e-3, token lr 2e-2); the authors' task_*.yml: rank 4, alpha 1 (scaling 1,
    # i.e. alpha = rank here), unet lr 1e-4, embedding lr 1e-3, batch 1 per GPU
    targets: str = setting("cross_attn", "adapted projections: 'cross_attn' = to_q/k/v/out of attn2 (the authors' "
                           "code), 'cross_kv' = K/V only", choices=tuple(CIDM_TARGETS))
    lam_spec: float = setting(0.1, "weight of the task-specific term mean|B_t B_i^T| (authors' train.py: 0.1)", min=0)
    lam_enh: float = setting(0.1, "weight of the term mean (B_t - 1)^2 (authors' code: the same 0.1)", min=0)
    ewa_power: float = setting(4.0, "exponent p of the EWA weights s_k^p (authors' code: 4)", gt=0)
    ewa_alpha: float = setting(0.8, "scale of the aggregated LoRAs at inference (authors' inference.py: 0.8)", min=0)


def cidm_config(rank: int, alpha: float, targets: str):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=CIDM_TARGETS[targets])


def consolidation_terms(new_b: list[torch.Tensor], old_b: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_orth, L_enh): means over (old task i, layer l) of mean|B_t^l B_i^l^T| and of mean (B_t^l - 1)^2."""
    orth = [(b @ old[l].to(b).T).abs().mean() for old in old_b for l, b in enumerate(new_b)]
    enh = [F.mse_loss(b, torch.ones_like(b)) for _ in old_b for b in new_b]
    return sum(orth) / len(orth), sum(enh) / len(enh)


def ewa_weights(prompt_feats: torch.Tensor, concept_feats: torch.Tensor, power: float = 4.0) -> torch.Tensor:
    """gamma_k = s_k^p / sum_j |s_j^p|, s_k = max over prompt rows i of cos(c_k, h_i); (T,) from (n x d), (T x d)."""
    h = F.normalize(prompt_feats.float(), dim=-1)
    c = F.normalize(concept_feats.float(), dim=-1)
    s = (c @ h.T).max(dim=1).values ** power
    return s / s.abs().sum()


@register("t2i", "cidm")
class CIDM(LoRAPerConcept):
    """CIDM (Dong et al., NeurIPS 2024, arXiv 2410.17594; code JiahuaDong/CIFC): per-concept LoRAs,
    L = L_diff + lam_spec mean|B_t B_i^T| + lam_enh mean(B_t - 1)^2, and at inference
    W = W_0 + alpha sum_k gamma_k s B_k A_k with gamma_k = s_k^p / sum_j s_j^p, s_k = max_i cos(c_k, h_i).
    """

    paper = ("Dong et al., How to Continually Adapt Text-to-Image Diffusion Models for Flexible Customization? "
             "(CIDM), NeurIPS 2024, arXiv:2410.17594")
    Settings = CIDMSettings

    # ------------------------------------------------------------------ adapters with CIDM's placement
    def add_task_adapter(self, task: Task) -> None:
        torch.manual_seed(self.seed * 1000 + task.index)
        s = self.settings
        lora.add_adapter(self.model.unet, cidm_config(s.rank, s.alpha, s.targets), self.adapter)

    def _fold(self, entry: dict[str, torch.Tensor]) -> None:
        """A loaded LoRA stays separate, as its concept's named adapter (disabled; EWA merges them per prompt)."""
        name = self.adapter_of(len(self.past) + 1)
        s = self.settings
        lora.add_adapter(self.model.unet, cidm_config(s.rank, s.alpha, s.targets), name)
        lora.set_factors(self.model.unet, name, lora.factors_of(entry))
        lora.enable_adapters(self.model.unet, False)

    # ------------------------------------------------------------------ concept consolidation loss
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        device = self.model.unet.device
        names = list(lora.lora_pairs(self.model.unet, self.adapter))
        self.old_b = [[entry[f"{n}.B"].to(device) for n in names] for entry in self.past]

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().loss(batch)
        s = self.settings
        if self.old_b and (s.lam_spec > 0 or s.lam_enh > 0):
            new_b = [b for _a, b, _s in lora.lora_pairs(self.model.unet, self.adapter).values()]
            out["orth"], out["enh"] = consolidation_terms(new_b, self.old_b)
            out["loss"] = out["loss"] + s.lam_spec * out["orth"] + s.lam_enh * out["enh"]
        return out

    # ------------------------------------------------------------------ elastic weight aggregation
    def concept_features(self) -> torch.Tensor:
        """(T x d): the text features of the learned concept tokens, encoded together ("<v1> <v2> ...")."""
        tokens = self.model.concept_tokens[: len(self.past)]
        ids = self.model.tokenize([" ".join(tokens)])
        with torch.no_grad():
            feats = self.model.text_encoder(ids)[0][0]
        row = ids[0].tolist()
        return torch.stack([feats[row.index(self.model.token_id(t))] for t in tokens])

    def ewa(self, prompt: str) -> torch.Tensor:
        """gamma (T,) for ``prompt``."""
        with torch.no_grad():
            h = self.model.encode_text([prompt])[0]
        return ewa_weights(h, self.concept_features(), self.settings.ewa_power)

    @contextlib.contextmanager
    def weights_for(self, prompt: str):
        """Within the block every adapted weight is W_0 + alpha sum_k gamma_k s B_k A_k; restored exactly after."""
        layers = lora.lora_layers(self.model.unet, None)
        before = {n: lora.base_weight(m).detach().clone() for n, m in layers.items()}
        chosen = list(range(1, len(self.past) + 1))
        try:
            lora.enable_adapters(self.model.unet, False)
            if chosen:
                gamma = self.ewa(prompt).tolist()
                for k, g in zip(chosen, gamma):
                    factors = lora.factors_of(self.past[k - 1])
                    lora.fold(self.model.unet, {n: (a, b, sc * self.settings.ewa_alpha * g)
                                                for n, (a, b, sc) in factors.items()})
            yield chosen
        finally:
            with torch.no_grad():
                for n, m in layers.items():
                    lora.base_weight(m).copy_(before[n])
            lora.enable_adapters(self.model.unet, False)
