"""FT: naive sequential fine-tuning of the whole network (the lower bound of CODA-Prompt's tables)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import register
from ..base import setting
from ..cls_base import ClsMethod, ClsTrainSettings


@dataclass
class FTSettings(ClsTrainSettings):
    # The whole ViT trains, so a fine-tuning learning rate: CODA-P's FT config (configs/cifar-100_ft.yaml)
    # uses 5e-5 for ViT-B with Adam (1/20 of the prompt methods' 1e-3; its repository has no ImageNet-R
    # FT config). The toy default keeps the same 1/20 ratio to the toy prompt learning rate.
    lr: float = setting(5e-5, "learning rate of the whole ViT and the head (CODA-P's FT config: 5e-5 for ViT-B)", gt=0)


class FullFinetune(ClsMethod):
    """Backbone + head trained by every task (CODA-P's ``NormalNN``: ``optimizer over model.parameters()``);
    the checkpoint holds the whole backbone."""

    Settings = FTSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        backbone.requires_grad_(True)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.backbone.parameters()) + list(self.head.parameters())}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        return state

    def load_state(self, state, tasks) -> None:
        super().load_state(state, tasks)
        self.backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})


@register("cls", "ft")
class FT(FullFinetune):
    """FT (sequential fine-tuning; the lower bound in CODA-Prompt, Smith et al., CVPR 2023, Table 1).

    Every task minimizes plain cross-entropy over all classes seen so far,
    ``L = CE(f(x)[:, :seen], y)``, training the whole ViT and the head with nothing against forgetting:
    the new classes' logits are pushed up and the old ones down, and the features drift.
    """

    paper = "Smith et al., CODA-Prompt, CVPR 2023 (FT baseline)"
