"""Merge & orthogonal initialization: one adapter passes on; each new A starts orthogonal to it, column by column.

Paper: Staniszewski, Zaleska, Deja, "Low-Rank Continual Personalization of Diffusion Models" (arXiv 2410.04891),
"merging LoRAs initialized with orthogonal weights". Code read for this file: github.com/luk-st/continual-lora
(commit eb586cd), ``lora/train_dreambooth_lora_sdxl.py`` (experiment ``ortho_init``: ``init_lora_with_checkpoint``,
``init_lora_with_checkpoint_rotate``, ``merge_loras``) and ``scripts_train/train_lora_args_ortho_init.sh``.

What passes between tasks is the base model and ONE adapter, whose factors are the sums of the tasks' factors
(their ``merge_loras`` adds the two LoRA state dicts key by key, A to A and B to B):

    Sigma_A_t = sum_{i<=t} A_i,      Sigma_B_t = sum_{i<=t} B_i,      W_t = W_0 + s Sigma_B_t Sigma_A_t,

the product of the sums, not the sum of the products (cross terms B_i A_j, i != j, included: the paper's final
model W_{1..T} = W_0 + B_{1..T} A_{1..T}). Task t (t > 1) trains on W_0 + s Sigma_B_{t-1} Sigma_A_{t-1} (their
script fuses the passed adapter into the base model, then adds a fresh one) with a fresh pair whose B starts at
zero (peft's gaussian init) and whose A is REPLACED by

    A_t[:, j] = a unit vector orthogonal to Sigma_A_{t-1}[:, j]       for every input column j,

the last right-singular vector of the 1 x r row Sigma_A_{t-1}[:, j] (their ``find_orthogonal_vector_svd``: each
column in R^r separately, so <A_t, Sigma_A_{t-1}>_F = 0; orthogonality holds at initialisation only, nothing
constrains training). Task 1 keeps peft's gaussian A. With rank 1 the construction returns the column's own
direction, so rank >= 2 is required here.

State: the concept rows and the passed adapter (``adapter.<module>.A``, ``.B``, ``.scaling``). The weights after
a task are rebuilt as ``W_0 + s Sigma_B Sigma_A`` live and on resume alike (bit-identical).

Where this differs from the authors' code: placement (to_q/k/v/out.0 of every attention), token and prompt as in
``lora_merge_consecutive``. Their evaluation (``eval/sample_images.py``) loads a saved full pipeline for
``ortho_init``, which their training script does not write (it saves only the summed LoRA); we read the evaluated
model as base + the summed adapter, the model their next task starts from. The SVD's sign is LAPACK's (as theirs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import lora
from ..base import Task, setting
from ..registry import register
from .lora_merge_consecutive import LoRAMerge, LoRAMergeSettings


@dataclass
class LoRAMergeOrthogonalSettings(LoRAMergeSettings):
    rank: int = setting(4, "LoRA rank (>= 2: a column orthogonal to a 1-d column does not exist; authors' code: 64)",
                        min=2)


def orthogonal_columns(a_prev: torch.Tensor) -> torch.Tensor:
    """(r x in): column j is a unit vector of R^r orthogonal to ``a_prev[:, j]`` (the last right-singular vector of
    that column seen as a 1 x r matrix, computed in float64)."""
    rows = a_prev.detach().double().T.unsqueeze(1)  # (in, 1, r)
    _, _, vh = torch.linalg.svd(rows)  # vh: (in, r, r)
    return vh[:, -1, :].T.to(a_prev.dtype)


@register("t2i", "lora_merge_orthogonal")
class LoRAMergeOrthogonal(LoRAMerge):
    """Merge & orthogonal init (Staniszewski et al., arXiv 2410.04891; code luk-st/continual-lora ``ortho_init``).

    W_t = W_0 + s (sum_i B_i)(sum_i A_i); A_t initialised column-wise orthogonal to sum_{i<t} A_i, B_t = 0.
    """

    paper = ("Staniszewski et al., Low-Rank Continual Personalization of Diffusion Models, arXiv:2410.04891 - "
             "merging orthogonally initialized LoRAs")
    Settings = LoRAMergeOrthogonalSettings

    def __init__(self, model, settings, seed: int = 0):
        super().__init__(model, settings, seed)
        self.sums: lora.Factors = {}  # module -> (Sigma_A, Sigma_B, scaling): the adapter that passes on

    def _tau_from_sums(self) -> None:
        self.tau = {n: lora.lora_delta(a, b, s) for n, (a, b, s) in self.sums.items()}

    def absorb(self, pairs: lora.Factors) -> None:
        for n, (a, b, s) in pairs.items():
            s = torch.tensor(float(s)).item()  # the scaling as stored (0-d float32): resume is then bit-identical
            old = self.sums.get(n)
            self.sums[n] = (a, b, s) if old is None else (old[0] + a, old[1] + b, s)
        self._tau_from_sums()

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)  # fresh adapter: gaussian A, zero B
        if self.sums:
            with torch.no_grad():
                for n, (a, _b, _s) in lora.lora_pairs(self.model.unet, self.adapter).items():
                    a.copy_(orthogonal_columns(self.sums[n][0]).to(a))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"task{i}.token": row.contiguous() for i, row in sorted(self.token_rows.items())}
        state.update({k: v.contiguous() for k, v in lora.factors_to_state(self.sums, prefix="adapter.").items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
        self.token_rows = self.restore_token_rows(state, tasks)
        self.sums = {n: (a.clone(), b.clone(), s) for n, (a, b, s) in lora.factors_of(state, "adapter.").items()}
        self._tau_from_sums()
        self._apply_tau()
        self.tasks_done = len(tasks)
