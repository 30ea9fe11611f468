"""Upper bound: every class trained jointly, offline (no continual learning)."""
from __future__ import annotations

from .. import register
from .ft import FullFinetune


@register("cls", "upper_bound")
class UpperBound(FullFinetune):
    """Upper bound (CODA-Prompt, Smith et al., CVPR 2023, Table 1 "Upper-Bound"; its ``--upper_bound_flag``
    makes the first task hold every class): the ViT and the head are fine-tuned once on the union of all
    tasks' training data, ``L = CE(f(x), y)`` over all classes, for the same number of epochs as one task
    of a continual run. Evaluated like the others (per-task accuracy with logits over all classes), so
    A_N is comparable; it has no forgetting (F_N is not defined). Trained: ViT + head.
    """

    paper = "Smith et al., CODA-Prompt, CVPR 2023 (upper bound)"
    joint = True
