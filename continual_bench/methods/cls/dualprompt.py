"""DualPrompt (Wang et al., ECCV 2022): a shared G-prompt and task-specific E-prompts, prefix-tuning."""
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
class DualSettings(ClsTrainSettings):
    e_pool: int = setting(0, "E-prompt pool size; 0 = the number of tasks (CODA-P's setting)", min=0)
    e_length: int = setting(20, "E-prompt length", min=1)
    e_layers: str = setting("2,3,4", "ViT blocks with E-prompts, comma-separated", pattern=LAYERS_PATTERN)
    g_length: int = setting(6, "G-prompt length", min=1)
    g_layers: str = setting("0,1", "ViT blocks with G-prompts, comma-separated (empty: none)", pattern=LAYERS_PATTERN)
    key_weight: float = setting(1.0, "weight of the key-query matching loss (CODA-P adds it with weight 1)", min=0)
    test_keys: str = setting("seen", "test-time E-prompt match: 'seen' = keys of learned tasks; 'pool' = all (CODA-P)",
                             choices=("seen", "pool"))


TEST_KEYS = ("seen", "pool")


@register("cls", "dualprompt")
class DualPrompt(PromptMethod):
    """DualPrompt (Wang et al., ECCV 2022, eqs. 2-5), as CODA-Prompt's ``models/zoo.py`` implements it.

    G-prompt g_l (length 6, layers 0-1), shared by all tasks and trained in every task. E-prompts
    e_{l,j} (length 20, layers 2-4) with keys k_{l,j}, one per task (pool = #tasks). Training on task t
    uses the task's own E-prompt (task-identity bootstrap) and pulls its key towards the queries::

        L = CE(masked past logits) + key_weight * sum_b sum_l (1 - cos(q(x_b), k_{l,t}))

    At test time each E-layer picks the prompt whose key best matches the query (top-1 cosine) among
    (``test_keys``)::

        seen:  argmax_{j <= t} cos(q(x), k_{l,j})        the keys of the t tasks learned so far
        pool:  argmax_{j <= M} cos(q(x), k_{l,j})        every key of the pool, untrained future ones included

    ``pool`` is what CODA-P's code does (``topk`` over the whole pool; REFERENCE.md sec. 6) and is the paper
    profile's setting, because CODA-P's DualPrompt numbers come from it. ``seen`` leaves out the prompts of
    tasks not yet learned, which a deployed learner would not have; it is the toy default (results/toy_cls ran
    with it). Prompts are prefix-tuned: E then G prefixes, halves as keys / values. Keys and prompts are
    initialized U[0, 1) as in CODA-P. Trained: G- and E-prompts, keys, head.
    """

    paper = "Wang et al., DualPrompt, ECCV 2022"
    Settings = DualSettings

    def __init__(self, backbone, settings, seed=0, n_classes=0, n_tasks=1):
        super().__init__(backbone, settings, seed, n_classes, n_tasks)
        where = "cls_method_settings.dualprompt"
        self.e_layers = parse_layers(settings.e_layers, backbone.depth, f"{where}.e_layers")
        self.g_layers = parse_layers(settings.g_layers, backbone.depth, f"{where}.g_layers")
        self.e_pool = settings.e_pool or n_tasks
        if self.e_pool < n_tasks:
            raise UserError(f"{where}.e_pool: {self.e_pool} E-prompts for {n_tasks} tasks (needs one per task)")
        if settings.test_keys not in TEST_KEYS:
            raise UserError(f"{where}.test_keys must be one of {', '.join(TEST_KEYS)}, got {settings.test_keys!r}")
        D = backbone.embed_dim
        prompt = nn.Module()
        for l in self.g_layers:
            prompt.register_parameter(f"g_{l}", uniform_prompt(settings.g_length, D))
        for l in self.e_layers:
            prompt.register_parameter(f"e_{l}", uniform_prompt(self.e_pool, settings.e_length, D))
            prompt.register_parameter(f"k_{l}", uniform_prompt(self.e_pool, D))
        self.net["prompt"] = prompt
        self.task_id = 0

    def begin_task(self, task):
        super().begin_task(task)
        self.task_id = task.index - 1

    def load_state(self, state, tasks):
        super().load_state(state, tasks)
        self.task_id = max(len(tasks) - 1, 0)

    def select(self, q: torch.Tensor, l: int, train: bool) -> torch.Tensor:
        """Index (B,) of the E-prompt each sample uses in layer ``l``."""
        P = self.net["prompt"]
        cos = cosine_matrix(q.detach(), getattr(P, f"k_{l}"))
        if train:
            self._aux.append(self.settings.key_weight * (1.0 - cos[:, self.task_id]).sum())
            return torch.full((len(q),), self.task_id, dtype=torch.long, device=q.device)
        if self.settings.test_keys == "pool":
            return cos.argmax(dim=1)
        return cos[:, :self.task_id + 1].argmax(dim=1)

    def prefixes(self, q, train):
        P = self.net["prompt"]
        B = len(q)
        out = {}
        for l in sorted(set(self.e_layers) | set(self.g_layers)):
            ks, vs = [], []
            if l in self.e_layers:
                e = getattr(P, f"e_{l}")[self.select(q, l, train)]  # (B, L, D)
                k, v = split_prefix(e)
                ks.append(k)
                vs.append(v)
            if l in self.g_layers:
                k, v = split_prefix(getattr(P, f"g_{l}").unsqueeze(0).expand(B, -1, -1))
                ks.append(k)
                vs.append(v)
            out[l] = (torch.cat(ks, dim=1), torch.cat(vs, dim=1))
        return out
