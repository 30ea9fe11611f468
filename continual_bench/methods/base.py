"""The small interface a text-to-image method fills.

The engine calls, for each task t (a new model object is built from the backbone for every task and
brought to the state after task t-1 by :meth:`T2IMethod.load_state`, so a resumed run is bit-identical
to an uninterrupted one):

    method = Method(model, settings, seed)      # the backbone as loaded from disk
    method.load_state(state_after_t-1, t-1)     # skipped for t = 1
    method.begin_task(task)                     # add the concept token, add adapters, snapshot a teacher...
    images, prompts = method.training_data(task)  # default: the task's images, each with method.prompt(task)
    for step: loss = method.loss(batch)         # shared diffusion loss + the method's own term
              optimizer over method.param_groups()
    method.end_task(task)                       # freeze, merge, compute a Fisher...
    state = method.state_dict()                 # everything needed to rebuild the model after task t

and for evaluation ``method.prompt(k)`` and ``method.generate(...)``.

Past data: a continual method never sees earlier tasks' images (``task.past[i].images`` is empty). A
non-continual reference method (the ``joint`` upper bound) sets the class attribute ``uses_past_data =
True``; the engine then loads every past concept's real training images into ``task.past[i].images``
before ``begin_task`` and empties them after the task. ``training_data`` lets a method train on more than
the task's own images (past images, replayed samples), with one prompt per image.
Hyper-parameters are a dataclass ``Settings`` (defaults = toy profile) whose fields are declared with
:func:`setting` (default, one line of help, valid range); the config's ``method_settings.<name>`` overrides
them; an unknown key or a value out of range is an error naming it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..utils import UserError


def setting(default, help: str, *, min=None, max=None, gt=None, lt=None, choices=None, pattern=None,
            multiple_of=None):
    """A field of a method's ``Settings`` dataclass: its default, one line of help and its valid values.

    ``min``/``max``: inclusive bounds; ``gt``/``lt``: exclusive bounds; ``choices``: the allowed values;
    ``pattern``: a regular expression a text value must match in full; ``multiple_of``: an integer step.
    :func:`build_settings` checks every given value against them (and the workflow checks every configured
    method's settings when the Snakefile loads), so a bad value is refused by name before anything runs.
    """
    meta = {"help": help}
    for key, value in (("min", min), ("max", max), ("gt", gt), ("lt", lt), ("choices", choices),
                       ("pattern", pattern), ("multiple_of", multiple_of)):
        if value is not None:
            meta[key] = tuple(value) if key == "choices" else value
    return dataclasses.field(default=default, metadata=meta)


def setting_meta(cls_settings: type, name: str) -> dict:
    """The metadata of field ``name``: its own, else that of the nearest base dataclass declaring it with some (a
    subclass that redeclares a field with a plain default keeps the base's range)."""
    for klass in getattr(cls_settings, "__mro__", (cls_settings,)):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            return dict(f.metadata)
    return {}


def allowed(meta: dict, name: str = "value") -> str:
    """The valid values of field ``name`` in words ("lr > 0", "rank >= 1 and rank <= 8", "one of ['base', 'current']")."""
    parts = []
    if "choices" in meta:
        parts.append(f"one of {list(meta['choices'])}")
    for key, op in (("gt", ">"), ("min", ">="), ("lt", "<"), ("max", "<=")):
        if key in meta:
            parts.append(f"{name} {op} {meta[key]}")
    if "multiple_of" in meta:
        parts.append(f"a multiple of {meta['multiple_of']}")
    if "pattern" in meta:
        parts.append(f"matching {meta['pattern']}")
    return " and ".join(parts) or "any value"


def check_setting(where: str, name: str, value, meta: dict) -> None:
    """Raise a one-line UserError naming ``where.name``, the value and the allowed range when ``value`` is outside it."""
    bad = False
    if isinstance(value, float) and not math.isfinite(value):
        bad = True
    if "choices" in meta and value not in meta["choices"]:
        bad = True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not bad:
        bad = (("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"])
               or ("gt" in meta and value <= meta["gt"]) or ("lt" in meta and value >= meta["lt"])
               or ("multiple_of" in meta and value % meta["multiple_of"] != 0))
    if isinstance(value, str) and "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        bad = True
    if bad:
        what = f" ({meta['help']})" if meta.get("help") else ""
        kind = "out of range" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not valid"
        raise UserError(f"{where}.{name}: {value!r} is {kind}; allowed: {allowed(meta, name)}{what}")


@dataclass
class TrainSettings:
    """Training settings every method has (toy-profile defaults)."""

    steps: int = setting(300, "optimizer steps per task", min=1)
    batch_size: int = setting(16, "images per step", min=1)
    lr: float = setting(1e-3, "learning rate (AdamW)", gt=0)
    grad_accum: int = setting(1, "batches accumulated per optimizer step", min=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = setting(1.0, "gradient-norm clipping; 0 = none", min=0)
    flip: bool = setting(True, "horizontal flip augmentation")


@dataclass
class Task:
    """One task of a sequence: the concept learned, its token and prompt, and its training images."""

    index: int  # 1-based position in the sequence
    concept: str  # concept name in the dataset manifest
    token: str  # e.g. "<v3>"
    prompt: str  # training/evaluation prompt, e.g. "a photo of <v3>"
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    class_word: str = ""  # "person", "waterfall": never in the prompt (C-LoRA sec. 3.3), used by some methods
    past: list["Task"] = dataclasses.field(default_factory=list)  # earlier tasks (their images are NOT given,
    # unless the method sets ``uses_past_data``)
    class_captions: list[str] = dataclasses.field(default_factory=list)  # captions of the dataset's generic
    # class images (no concept), e.g. regularization captions; text only, no images

    @property
    def generic_prompt(self) -> str:
        """The relevant-concept prompt: the class word without any concept token ("a photo of a person")."""
        return generic_prompt(self.class_word)


def generic_prompt(class_word: str) -> str:
    """LFS-Diffusion's relevant concept ("a photo of a cat"); the same text evaluation samples as ``generic``."""
    return f"a photo of a {class_word}" if class_word else "a photo"


def build_settings(cls_settings: type, overrides: dict | None, where: str):
    """Instantiate a settings dataclass from ``overrides``; unknown keys, wrong types and values outside a field's
    range (:func:`setting`) are errors naming ``where.<key>``, the value and what is allowed. A Settings class may
    add a ``check(where)`` method for constraints between fields."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls_settings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    defaults = cls_settings()
    for k, v in overrides.items():
        want = type(getattr(defaults, k))
        if isinstance(v, str) and want in (int, float):  # values given on the command line arrive as text
            try:
                v = overrides[k] = want(v)
            except ValueError:
                raise UserError(f"{where}.{k}: expected {want.__name__}, got {v!r}") from None
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = overrides[k] = float(v)
        elif want in (int, float, bool, str) and (not isinstance(v, want) or (isinstance(v, bool) and want is not bool)):
            raise UserError(f"{where}.{k}: expected {want.__name__}, got {v!r}")
        check_setting(where, k, v, setting_meta(cls_settings, k))
    settings = cls_settings(**overrides)
    if callable(getattr(settings, "check", None)):
        settings.check(where)
    return settings


class T2IMethod:
    """Base class of text-to-image continual customization methods (track ``t2i``).

    Subclasses must set ``paper`` and document the equation they implement in their docstring.
    """

    name: ClassVar[str]
    track: ClassVar[str]
    paper: ClassVar[str] = ""
    Settings: ClassVar[type] = TrainSettings
    #: True only for non-continual references (``joint``): the engine fills ``task.past[i].images`` with the
    #: past concepts' real training images before ``begin_task``. Continual methods leave it False.
    uses_past_data: ClassVar[bool] = False
    #: True when the method (with its default settings) keeps data derived from the user's training images
    #: after a task (e.g. LFS-Diffusion's image-context ICGen stores their latents); listed by ``methods``.
    stores_user_data: ClassVar[bool] = False

    def __init__(self, model, settings, seed: int = 0):
        self.model = model
        self.settings = settings
        self.seed = seed
        self.tasks_done = 0

    # ---------------------------------------------------------------- hooks a method overrides
    def begin_task(self, task: Task) -> None:
        """Prepare the model for ``task`` (default: add its concept token, random-init)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + task.index)
        self.model.add_concept_token(task.token, generator=g)

    def training_data(self, task: Task) -> tuple[torch.Tensor, list[str]]:
        """The images this task trains on, (N, 3, H, W) in [0, 1], and one prompt per image.

        Called by the engine once per task, after :meth:`begin_task`; the engine adds flipped copies (same
        prompts), caches their latents and draws each batch's images and prompts together. Default: the
        task's own images, every one with ``self.prompt(task)``.
        """
        return task.images, [self.prompt(task)] * len(task.images)

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Default: the diffusion loss on the batch's latents and prompts. Must return key ``loss``."""
        emb = self.model.encode_text(batch["prompts"])
        return {"loss": self.model.diffusion_loss(batch["latents"], emb, generator=batch["generator"])}

    def end_task(self, task: Task) -> None:
        self.tasks_done = task.index

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild the model after the tasks done so far (stored as safetensors)."""
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        """Bring the freshly loaded backbone to the state after ``tasks`` (their images are empty)."""
        raise NotImplementedError

    def restore_token_rows(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> dict[int, torch.Tensor]:
        """Re-add each finished task's concept token with its stored row ``task{i}.token``; returns the rows."""
        rows = {}
        for task in tasks:
            row = state[f"task{task.index}.token"]
            self.model.add_concept_token(task.token, init=row)
            rows[task.index] = row.detach().clone()
        return rows

    # ---------------------------------------------------------------- counts (N_train, N_store)
    def n_trained(self) -> int:
        """Parameters trained in one task."""
        return sum(p.numel() for g in self.param_groups() for p in g["params"] if p.requires_grad)

    def n_stored(self) -> int:
        """Parameters stored in total after the tasks done (beyond the frozen backbone)."""
        return sum(v.numel() for v in self.state_dict().values() if v.dim() > 0)

    # ---------------------------------------------------------------- evaluation
    def prompt(self, task: Task) -> str:
        return task.prompt

    def generate(self, task: Task, n: int, *, seed: int, **sample_kw) -> np.ndarray:
        """``n`` images of ``task``'s concept with the current model."""
        return self.generate_prompt(self.prompt(task), n, seed=seed, **sample_kw)

    def generate_prompt(self, prompt: str, n: int, *, seed: int, **sample_kw) -> np.ndarray:
        """``n`` images of a free prompt (e.g. the generic class, for relevant-concept forgetting)."""
        return self.model.generate([prompt] * n, seed=seed, **sample_kw)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "paper": self.paper, **dataclasses.asdict(self.settings)}
