"""Joint training: the non-continual upper bound, every concept seen so far trained with its real images.

Paper: the joint-training upper bound that continual-learning comparisons report next to continual
methods (e.g. CODA-Prompt's "upper bound" row; this suite's classification track has ``upper_bound``),
here for the text-to-image customization of Smith et al., "Continual Diffusion" (C-LoRA), TMLR 2024,
arXiv 2304.06027; training one model on several concepts' images together is Custom Diffusion's joint
multi-concept fine-tuning (Kumari et al., CVPR 2023). It is NOT a continual method: it reads the past
concepts' real images (``uses_past_data = True``), which every continual method is denied.

Equation: at task t the model minimises the diffusion loss over the union of all data seen so far,

    L_t = E_{k ~ U{1..t}, x ~ D_k} [ L_diff(x, p_k) ],      p_k = "a photo of <vk>",

(each concept has the same number of images in the benchmarks, so drawing images uniformly from the union
weighs concepts equally), with the same parameterisation as ``lora_sequential``: a fresh LoRA pair on the
cross-attention K/V, folded after the task, W_t = W_{t-1} + A_t B_t; the token rows of ALL concepts seen
so far train (their stored embeddings are updated after every task).

Retrain or continue? It continues: task t starts from the joint model after task t-1 and trains the
same ``steps`` as every other method, on D_1 u ... u D_t. So the comparison is fair in steps per task and
in total steps (T x steps for the final model, as for the sequential methods), R[t][k] is a model trained
jointly on concepts 1..t, and the cost does not grow with t. Retraining from scratch with ``steps`` per
task would give the final model fewer steps on each concept than the sequential methods gave it, and
from scratch with t x steps would make the last task t times as expensive. Within a task, concept t gets
about 1/t of the samples, so "learning right after the task" (P) of late concepts may be lower than a
sequential method's, while older concepts keep being trained: the upper bound is on A and F.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import T2IMethod, Task
from ..registry import register
from .lora_sequential import LoRASequential, LoRASettings, freeze_all_but_token


@dataclass
class JointSettings(LoRASettings):
    """The same as ``lora_sequential`` (toy: rank 4, lr 5e-3, token lr 2e-2; paper profile: rank 16, lr 5e-4)."""


@register("t2i", "joint")
class Joint(LoRASequential):
    """Joint training on all concepts seen so far (non-continual upper bound; reads past real images).

    L_t = mean over the union D_1..D_t of L_diff(x, p_k); W_t = W_{t-1} + A_t B_t (LoRA on K/V), all tokens train.
    """

    paper = ("joint-training upper bound (non-continual reference) for the setting of Smith et al., Continual "
             "Diffusion (C-LoRA), TMLR 2024, arXiv:2304.06027")
    Settings = JointSettings
    uses_past_data = True

    def begin_task(self, task: Task) -> None:
        T2IMethod.begin_task(self, task)  # the new concept token
        self.add_task_adapter(task)
        self.token_id = self.model.token_id(task.token)
        self.token_ids = [self.model.token_id(p.token) for p in task.past] + [self.token_id]
        self.emb = freeze_all_but_token(self.model, self.token_ids)  # every seen concept's row trains

    def training_data(self, task: Task) -> tuple[torch.Tensor, list[str]]:
        missing = [p.index for p in task.past if not len(p.images)]
        if missing or not len(task.images):
            raise ValueError(f"joint: task {task.index} has no real images of task(s) {missing or [task.index]}; "
                             "the engine provides them because joint sets uses_past_data")
        seen = [*task.past, task]
        images = torch.cat([tk.images for tk in seen])
        prompts = [self.prompt(tk) for tk in seen for _ in range(len(tk.images))]
        return images, prompts

    def n_trained(self) -> int:
        return sum(p.numel() for p in self.lora_parameters()) + len(self.token_ids) * self.emb.shape[1]

    def end_task(self, task: Task) -> None:
        for entry, p in zip(self.past, task.past):  # the past concepts' rows moved too: store their new values
            entry["token"] = self.emb[self.model.token_id(p.token)].detach().clone()
        super().end_task(task)
