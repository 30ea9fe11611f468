"""Custom Diffusion trained sequentially: cross-attention key/value weights + the concept token.

Paper: Kumari, Zhang, Zhang, Shechtman, Zhu, "Multi-Concept Customization of Text-to-Image Diffusion",
CVPR 2023 (arXiv 2212.04488): its single-concept fine-tuning (only the cross-attention key/value
projections and the modifier token change), run sequentially as the sequential Custom Diffusion baseline
of C-LoRA (Smith et al., "Continual Diffusion", TMLR 2024, arXiv 2304.06027).

Equation: for every cross-attention layer the key and value projections W^k, W^v (``attn2.to_k``,
``attn2.to_v``) and the modifier token's embedding V* are the only variables; everything else is frozen:

    min_{W^k, W^v, V*}  E_{z, c, eps, t} || target - f_theta(z_t, t, c(V*)) ||^2,
    K = W^k c,  V = W^v c      (cross-attention keys/values of the text features c).

Sequentially, task t starts from the K/V weights left by task t-1 (W_t = W_{t-1} + Delta_t, no reset), so
nothing protects earlier concepts (``custom_diffusion_ewc`` adds a penalty that does).

Choices, stated:
- Token and prompt: Custom Diffusion initialises its modifier token from an existing rare token and
  prompts "photo of a V* dog". This suite follows C-LoRA's customized-token protocol for every method:
  a new, randomly initialised row per concept and the engine's prompt "a photo of <vK>" without a class word,
  exactly as ``lora_sequential`` does; only the comparison's variable (what is trained) changes.
- As in diffusers' ``examples/custom_diffusion``, the key/value of the first (start-of-text) token
  is detached (``detach_first_token``): that token's key/value is the same for every prompt, so training
  it would change every prompt alike. This changes gradients only, never a forward value.
- Custom Diffusion's regularisation set (200 retrieved real images of the class, prior weight 1.0) is
  not implemented: a method gets only the current task's images here (``dreambooth`` has a prior
  term on images the model generates itself).

N_train = the K/V weights + one embedding row; N_store = the K/V weights + T embedding rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import T2IMethod, Task, TrainSettings, setting
from ..registry import register
from .lora_sequential import CROSS_ATTN_KV, freeze_all_but_token


@dataclass
class CustomDiffusionSettings(TrainSettings):
    # Toy profile. Paper profile: 5e-6 for all non-LoRA methods (C-LoRA paper, experiment setup); Custom
    # Diffusion's own recipe is 1e-5 x batch x accumulation x GPUs.
    lr: float = setting(5e-4, "learning rate of the K/V weights (measured: toy_faces seed 0, concept 1, 120 steps x 8: "
                        "oracle 32/32; paper profile: 5e-6)", gt=0)
    token_lr: float = setting(2e-2, "learning rate of the concept token's embedding row (as lora_sequential); 0 = frozen",
                              min=0)
    detach_first_token: bool = setting(True, "no gradient through the start-of-text token's key/value")


def cross_attention_kv(unet) -> dict[str, torch.nn.Module]:
    """Module name -> ``attn2.to_k`` / ``attn2.to_v`` linear layer (the cross-attention K/V projections)."""
    return {n: m for n, m in unet.named_modules() if n.endswith(tuple(CROSS_ATTN_KV)) and isinstance(m, torch.nn.Linear)}


def _detach_first_token(module, inputs, output):
    """Forward hook: same value, but the key/value of token 0 (start of text) gets no gradient."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


@register("t2i", "custom_diffusion")
class CustomDiffusion(T2IMethod):
    """Custom Diffusion, sequential (Kumari et al., CVPR 2023, arXiv 2212.04488).

    Trains the cross-attention W^k, W^v (attn2.to_k / attn2.to_v, full weights) and the concept token;
    L = L_diffusion. Task t continues from task t-1's weights.
    """

    paper = "Kumari et al., Multi-Concept Customization of Text-to-Image Diffusion (Custom Diffusion), CVPR 2023, arXiv:2212.04488"
    Settings = CustomDiffusionSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        self.kv = cross_attention_kv(model.unet)
        if not self.kv:
            raise ValueError("custom_diffusion: the UNet has no cross-attention attn2.to_k/to_v layers")
        self.rows: dict[int, torch.Tensor] = {}
        self._hooks: list = []

    def kv_weights(self) -> dict[str, torch.nn.Parameter]:
        return {n: m.weight for n, m in self.kv.items()}

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)  # random-init concept token (C-LoRA convention)
        self.token_id = self.model.token_id(task.token)
        self.emb = freeze_all_but_token(self.model, [self.token_id])
        for w in self.kv_weights().values():
            w.requires_grad_(True)
        if self.settings.detach_first_token:
            self._hooks = [m.register_forward_hook(_detach_first_token) for m in self.kv.values()]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.kv_weights().values()), "lr": self.settings.lr,
                 "weight_decay": self.settings.weight_decay},
                {"params": [self.emb], "lr": self.settings.token_lr, "weight_decay": 0.0}]

    def n_trained(self) -> int:
        return sum(w.numel() for w in self.kv_weights().values()) + int(self.model.token_embeddings().shape[1])

    def end_task(self, task: Task) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.rows[task.index] = self.emb[self.token_id].detach().clone()
        self.emb.requires_grad_(False)
        for w in self.kv_weights().values():
            w.requires_grad_(False)
        super().end_task(task)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"task{i}.token": v.contiguous() for i, v in sorted(self.rows.items())}
        state.update({f"kv.{n}": w.detach().contiguous() for n, w in self.kv_weights().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        self.rows.update(self.restore_token_rows(state, tasks))
        with torch.no_grad():
            for n, w in self.kv_weights().items():
                w.copy_(state[f"kv.{n}"])
        self.tasks_done = len(tasks)
