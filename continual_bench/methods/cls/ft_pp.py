"""FT++: sequential fine-tuning with the past classes' logits masked in the loss (CODA-Prompt's baseline)."""
from __future__ import annotations

from .. import register
from .ft import FullFinetune


@register("cls", "ft_pp")
class FTPP(FullFinetune):
    """FT++ (Smith et al., CODA-Prompt, CVPR 2023, sec. 5): FT with L2P's classifier loss, i.e. the past
    classes' logits are -inf in the training loss (CODA-P ``learners/prompt.py``:
    ``logits[:, :last_valid_out_dim] = -inf``)::

        L = CE([-inf ... -inf, f(x)[:, lo:hi]], y)        lo = first output of the current task

    Past head rows get no gradient (old classes are not pushed down), but the whole ViT still trains,
    so the features drift under the old rows. Trained: ViT + head.
    """

    paper = "Smith et al., CODA-Prompt, CVPR 2023 (FT++ baseline)"
    mask_past = True
