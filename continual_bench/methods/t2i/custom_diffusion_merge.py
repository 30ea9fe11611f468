"""Custom Diffusion, merged: per-concept K/V fine-tuning combined by the closed-form constrained optimization.

Paper: Kumari, Zhang, Zhang, Shechtman, Zhu, "Multi-Concept Customization of Text-to-Image Diffusion",
CVPR 2023 (arXiv 2212.04488), sec. 3.2, merging concepts by constrained optimization; the "Custom Diffusion
(merged)" baseline of C-LoRA (Smith et al., "Continual Diffusion", TMLR 2024, arXiv 2304.06027, Table 1).
Reference code read for this file: ``src/diffusers_composenW.py`` of github.com/adobe-research/custom-diffusion
(commit 74d1fa987961f3e0a21be3db3765c89f40078a8f), functions ``compose`` and ``gdupdateWexact``.

Per task (Custom Diffusion's fine-tuning, sec. 3.1): starting from the BASE weights W0 (not from the
merged model), train the cross-attention key/value projections W^k, W^v (``attn2.to_k``/``attn2.to_v``)
and the concept token's embedding with the diffusion loss; store that concept's weights {W_n} and token.
Then merge the N concepts seen so far, for every projection separately:

    W_hat = argmin_W || W C_reg^T - W0 C_reg^T ||_F^2     s.t.   W C^T = V,

    C   = [c_1; ...; c_s]  (s x d): text features of the concepts' target words, each concept's rows from its
          own prompt, computed with the merged model's text encoder (all tokens present);
    V   = [W_1 c_1^T ... ] (out x s): what concept n's fine-tuned weights W_n output on its own rows;
    C_reg (m x d): text features of regularization captions (generic captions: they fix W's behaviour on
          ordinary text; the reference code reads the first 200 lines of a caption file, here a fixed draw of
          ``n_reg_captions`` = 200 of the dataset's generic-class captions).

Derivation (Lagrange multipliers). With G = C_reg^T C_reg (d x d, symmetric positive definite) the objective is
tr((W - W0) G (W - W0)^T). The Lagrangian tr((W - W0) G (W - W0)^T) - 2 tr(Lambda^T (W C^T - V)), Lambda (out x s),
has gradient 2 (W - W0) G - 2 Lambda C = 0, so W = W0 + Lambda C G^-1. Substituting into W C^T = V:
W0 C^T + Lambda (C G^-1 C^T) = V, hence Lambda = (V - W0 C^T) (C G^-1 C^T)^-1. With the paper's names,

    d = C (C_reg^T C_reg)^-1  (s x d),     v^T = (V - W0 C^T) (d C^T)^-1  (out x s),     W_hat = W0 + v^T d.

This is the reference code's ``gdupdateWexact``: d = solve(K^T K, K_t^T)^T, W_new = W + (V_t^T - W K_t^T)
(d K_t^T)^-1 d with K = C_reg, K_t = C. With no constraint rows (s = 0) W_hat = W0. The constraint holds
exactly whenever C has full row rank (s <= d); the objective is minimal among all such W. ``ridge`` adds
ridge * tr(G)/d * I to G (keeps G invertible when the captions give fewer than d independent rows, as a
random-weight or tiny text encoder can); it changes which W is chosen, never the constraint. The reference
code has no ridge (``ridge: 0``).

Choices, stated:
- Rows: the reference code encodes captions without padding and drops the start-of-text row; its
  targets are the rows of "<newk> category" and "photo of a <newk> category" from the modifier token on
  (the "photo of a" rows dropped; exact duplicates removed). Here: regularization rows = every token after
  start-of-text up to and including end-of-text; a concept's rows = those of its evaluation prompt
  "a photo of <vk>" from the concept token on ("<vk>", end-of-text; no class word in this suite's prompts).
  The rows before the concept token ("a photo of") have the same causal text features for every concept
  and the generic prompt, so constraining them to different targets would contradict itself (the reason
  the reference code drops them too). Two rows per concept keep s = 2T <= d up to T = 32 for the toy text
  width 64 (SD: 768). With s > d or dependent rows the pseudo-inverse gives the least-squares fit.
- Token and prompt as in ``custom_diffusion`` and ``lora_sequential`` (C-LoRA's protocol, sec. 3.3): a
  new random token row per concept, "a photo of <vk>"; the start-of-text key/value is detached in training
  (diffusers' ``examples/custom_diffusion``, REFERENCE.md sec. 1); no regularization images.
- N_store = T x (K/V weights + one row): each concept's fine-tuned weights are kept so that every new task
  can re-merge all concepts (the merged model is recomputed from them, exactly, on every restart).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ...utils import UserError
from ..base import T2IMethod, Task, TrainSettings, setting
from ..registry import register
from .lora_sequential import CROSS_ATTN_KV, freeze_all_but_token


@dataclass
class CustomDiffusionMergeSettings(TrainSettings):
    # Toy profile. Paper profile: lr 5e-6 for all non-LoRA methods (C-LoRA paper); Custom Diffusion's own
    # recipe is 1e-5 x batch x accumulation x GPUs. Not tuned for the toy world (same as custom_diffusion).
    lr: float = setting(5e-4, "learning rate of the K/V weights (paper profile: 5e-6)", gt=0)
    token_lr: float = setting(2e-2, "learning rate of the concept token's embedding row (as lora_sequential); 0 = frozen",
                              min=0)
    detach_first_token: bool = setting(True, "no gradient through the start-of-text token's key/value")
    n_reg_captions: int = setting(200, "regularization captions (generic-class captions of the dataset)", min=1)
    ridge: float = setting(0.0, "relative ridge on C_reg^T C_reg; 0 = the paper's objective (reference code: none)",
                           min=0)


# ------------------------------------------------------------------------------------------- closed form
def merge_directions(c_reg: torch.Tensor, c: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``d = C (C_reg^T C_reg)^-1`` (s x d) and ``(d C^T)^+`` (s x s), shared by every projection."""
    c_reg, c = c_reg.double(), c.double()
    g = c_reg.T @ c_reg
    if ridge:
        g = g + ridge * torch.trace(g) / g.shape[0] * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    ev = torch.linalg.eigvalsh(g)
    if not ev[0] > ev[-1] * 1e-13:
        raise UserError(f"custom_diffusion_merge: the regularization captions' text features span too few directions "
                        f"({c_reg.shape[0]} rows, width {g.shape[0]}, condition number "
                        f"{(ev[-1] / ev[0].clamp_min(1e-300)).item():.1e}); use more captions (n_reg_captions) "
                        "or a ridge > 0 (e.g. 1e-6)")
    d = torch.linalg.solve(g, c.T).T  # G symmetric: (G^-1 C^T)^T = C G^-1
    return d, torch.linalg.pinv(d @ c.T, hermitian=True)


def apply_merge(w0: torch.Tensor, c: torch.Tensor, v: torch.Tensor, d: torch.Tensor,
                a_inv: torch.Tensor) -> torch.Tensor:
    """``W_hat = W0 + (V - W0 C^T) (d C^T)^-1 d`` (float64)."""
    w0 = w0.double()
    if not len(c):
        return w0.clone()
    return w0 + (v.double() - w0 @ c.double().T) @ a_inv @ d


def closed_form_merge(w0: torch.Tensor, c_reg: torch.Tensor, c: torch.Tensor, v: torch.Tensor,
                      ridge: float = 0.0) -> torch.Tensor:
    """argmin_W ||W C_reg^T - W0 C_reg^T||_F^2 s.t. W C^T = V (Kumari et al. 2023, sec. 3.2); float64."""
    if not len(c):
        return w0.double().clone()
    d, a_inv = merge_directions(c_reg, c, ridge)
    return apply_merge(w0, c, v, d, a_inv)


# ------------------------------------------------------------------------------------------- text rows
def text_rows(model, prompts: list[str], from_tokens: list[str] | None = None) -> list[torch.Tensor]:
    """Per prompt, its text-encoder output rows (n_i x d): from the first of ``from_tokens`` found in it
    (default: the token after start-of-text) up to and including end-of-text; padding left out."""
    ids = model.tokenize(prompts)
    with torch.no_grad():
        feats = model.text_encoder(ids)[0].float()
    eos = model.tokenizer.eos_token_id
    starts = {model.token_id(t) for t in (from_tokens or [])}
    out = []
    for b in range(len(prompts)):
        row = ids[b].tolist()
        end = row.index(eos) if eos in row else len(row) - 1
        start = next((i for i, x in enumerate(row) if x in starts), 1) if starts else 1
        out.append(feats[b, start:end + 1])
    return out


def regularization_captions(task: Task, n: int) -> list[str]:
    """``n`` generic captions: the dataset's generic-class captions (a fixed draw), else simple class templates."""
    caps = list(task.class_captions)
    if len(caps) > n:
        caps = random.Random(0).sample(caps, n)
    if not caps:
        w = task.class_word or "thing"
        caps = [task.generic_prompt, f"a {w}", f"a picture of a {w}", f"a close-up photo of a {w}",
                f"a {w} in the daylight", f"a bright photo of the {w}", f"a cropped photo of a {w}"]
    return caps


def cross_attention_kv(unet) -> dict[str, torch.nn.Linear]:
    """Module name -> ``attn2.to_k`` / ``attn2.to_v`` linear layer (the cross-attention K/V projections)."""
    return {n: m for n, m in unet.named_modules()
            if n.endswith(tuple(CROSS_ATTN_KV)) and isinstance(m, torch.nn.Linear)}


def _detach_first_token(module, inputs, output):
    """Forward hook: same value, but the key/value of token 0 (start of text) gets no gradient."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


@register("t2i", "custom_diffusion_merge")
class CustomDiffusionMerge(T2IMethod):
    """Custom Diffusion with the closed-form merge of per-concept K/V (Kumari et al., CVPR 2023, sec. 3.2).

    W_hat = W0 + v^T d, d = C (C_reg^T C_reg)^-1, v^T = (V - W0 C^T)(d C^T)^-1, re-merged after every task.
    """

    paper = ("Kumari et al., Multi-Concept Customization of Text-to-Image Diffusion (Custom Diffusion), CVPR 2023, "
             "arXiv:2212.04488 - closed-form merge; merged baseline of C-LoRA (TMLR 2024)")
    Settings = CustomDiffusionMergeSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        self.kv = cross_attention_kv(model.unet)
        self.w_init = {n: m.weight.detach().clone() for n, m in self.kv.items()}  # W0
        self.past: list[dict[str, torch.Tensor]] = []  # per concept: token + its fine-tuned K/V weights
        self.tasks: list[Task] = []
        self._hooks = []

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        with torch.no_grad():  # every concept is fine-tuned from the base weights, as in Custom Diffusion
            for n, m in self.kv.items():
                m.weight.copy_(self.w_init[n])
        for m in self.kv.values():
            m.weight.requires_grad_(True)
            if self.settings.detach_first_token:
                self._hooks.append(m.register_forward_hook(_detach_first_token))
        self.token_id = self.model.token_id(task.token)
        self.emb = freeze_all_but_token(self.model, [self.token_id])

    def param_groups(self) -> list[dict]:
        return [{"params": [m.weight for m in self.kv.values()], "lr": self.settings.lr,
                 "weight_decay": self.settings.weight_decay},
                {"params": [self.emb], "lr": self.settings.token_lr, "weight_decay": 0.0}]

    def n_trained(self) -> int:
        return sum(m.weight.numel() for m in self.kv.values()) + self.emb.shape[1]

    def end_task(self, task: Task) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        entry = {"token": self.emb[self.token_id].detach().clone()}
        for n, m in self.kv.items():
            m.weight.requires_grad_(False)
            entry[f"{n}.weight"] = m.weight.detach().clone()
        self.past.append(entry)
        self.tasks.append(task)
        self.merge()
        super().end_task(task)

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Set every K/V projection to the closed-form merge of all concepts stored so far."""
        if not self.tasks:
            return
        s = self.settings
        reg = torch.cat(text_rows(self.model, regularization_captions(self.tasks[-1], s.n_reg_captions)))
        rows = [text_rows(self.model, [self.prompt(t)], [t.token])[0] for t in self.tasks]
        c = torch.cat(rows)
        d, a_inv = merge_directions(reg, c, s.ridge)
        with torch.no_grad():
            for n, m in self.kv.items():
                v = torch.cat([e[f"{n}.weight"].float() @ r.T for e, r in zip(self.past, rows)], dim=1)
                m.weight.copy_(apply_merge(self.w_init[n], c, v, d, a_inv).to(m.weight.dtype))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"task{i}.{k}": v.contiguous() for i, e in enumerate(self.past, start=1) for k, v in e.items()}

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        for task in tasks:
            entry = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"task{task.index}.")}
            self.model.add_concept_token(task.token, init=entry["token"])
            self.past.append(entry)
            self.tasks.append(task)
        self.merge()
        self.tasks_done = len(tasks)
