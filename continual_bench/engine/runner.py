"""What both training engines share: the run spec and its fingerprint, the checkpoint folder with its integrity
checks, resume, the task loop, the optimizer step with its non-finite-loss stop, progress and logging.

A track (:mod:`.t2i`, :mod:`.cls`) subclasses :class:`BaseRunSpec` and fills in only what differs: its data,
how its method is built, what its fingerprint covers, and the per-task hook (its batches and optimizer around a
:class:`TaskLoop`, plus evaluation for the classification track). Every task's randomness is seeded from
(seed, task), and before every task the method is rebuilt from the backbone on disk and the previous task's
checkpoint (:meth:`BaseRunSpec.restore`), whether or not the process restarted, so a killed run continues at the
first unfinished task and produces the same numbers as an uninterrupted one.

Checkpoint layout (:class:`Checkpoints`, the run's ``checkpoints/`` folder)::

    <fingerprint>/run.json                      what the fingerprint covers
    <fingerprint>/task_001/meta.json            the task's record (loss summary, N_train, N_store, seconds, ...) and
                                                state_sha256, the sha256 of its state file
    <fingerprint>/task_001/state.safetensors    method.state_dict() after task 1

A state file is trusted only when it matches the sha256 its meta.json records (checkpoints from before the hash was
recorded: a well-formed safetensors file of the size its header gives), when training decides what is done and
again at every load. Which states are kept is the track's choice (``keep_states``): the text-to-image track keeps
every task's (evaluation samples the model after each task), and a task whose state fails the check is trained
again from the task before; the classification track keeps only the last one (every task's accuracies are in its
meta.json), and resumes from the latest task whose state is intact. A non-finite loss stops the run with an error
naming the run, the loss, the task and the step; that task's checkpoint is not written.

States shared by runs of different lengths (:func:`reuse_states`): a method sees one task at a time, and a task's
training depends only on the state before it, the task and (seed, task), so the state after task ``t`` of a run is
the state after task ``t`` of every run with the same method, settings, seed, backbone and first ``t`` concepts:
the 5-task run is the first five tasks of the 20-task run. A track may declare which of another run's checkpoint
folders qualify (:meth:`BaseRunSpec.reusable_prefix`, checked against that folder's fingerprint); their intact
leading states are copied in (sha256 checked again) and marked ``reused_from`` in their meta.json, instead of being
trained again. ``tests/test_engine.py`` checks that the copied run equals one trained from scratch, file for file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
from safetensors.torch import save_file

from ..run_files import META, STATE, load_state, read_json, state_problem
from ..utils import UserError, atomic_write_json, config_hash, file_sha256, progress, seed_everything, stable_seed

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def amp_context(device: str, precision: str = "bf16") -> Callable:
    """bf16 autocast on CUDA with ``precision='bf16'``; nothing otherwise (CPU, or ``'fp32'``)."""
    if device.startswith("cuda") and precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_task(prefix: str, seed: int, task_index: int) -> torch.Generator:
    """Seed every global RNG from (run seed, task) and return the task's batch generator (``prefix`` keeps the
    tracks' streams apart: ``""`` for text-to-image, ``"cls-"`` for classification)."""
    seed_everything(stable_seed(f"{prefix}train", seed, task_index))
    return torch.Generator().manual_seed(stable_seed(f"{prefix}batches", seed, task_index))


# ------------------------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """One run's checkpoint folder: a ``task_<t>`` folder per finished task (see the module docstring)."""

    def __init__(self, root: str | Path, keep_states: bool = True):
        self.root = Path(root)
        self.keep_states = keep_states

    def task_dir(self, t: int) -> Path:
        return self.root / f"task_{t:03d}"

    def has_meta(self, t: int) -> bool:
        return (self.task_dir(t) / META).is_file()

    def read_meta(self, t: int) -> dict:
        return read_json(self.task_dir(t) / META)

    def state_problem(self, t: int) -> str | None:
        """Why task ``t``'s state cannot be trusted (missing, sha256 mismatch, truncated), or None."""
        return state_problem(self.task_dir(t) / STATE, self.read_meta(t).get("state_sha256"))

    def load_state(self, t: int, device: str = "cpu") -> dict:
        """Task ``t``'s tensors, checked against the sha256 its meta.json records."""
        return load_state(self.task_dir(t) / STATE, self.read_meta(t).get("state_sha256"), device=device)

    @contextlib.contextmanager
    def _writing(self, t: int):
        """A temporary folder to fill with task ``t``'s files, renamed into place on success: a task folder is
        complete or absent."""
        final = self.task_dir(t)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".task_{t:03d}.", dir=self.root))
        try:
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def adopt(self, t: int, src: "Checkpoints", meta: dict) -> None:
        """Copy task ``t``'s state from another run's checkpoints ``src`` (``meta``: its meta.json, checked intact by
        the caller), recording where it came from; written like :meth:`save`, then checked against its sha256."""
        with self._writing(t) as tmp:
            shutil.copyfile(src.task_dir(t) / STATE, tmp / STATE)
            (tmp / META).write_text(json.dumps({**meta, "reused_from": str(src.task_dir(t))}, indent=1))
        problem = self.state_problem(t)
        if problem:  # the source changed under us: the task is trained instead
            shutil.rmtree(self.task_dir(t))
            raise UserError(f"{self.task_dir(t) / STATE}: copied from {src.task_dir(t)} but {problem}")

    def save(self, t: int, method, meta: dict) -> None:
        """Write task ``t``'s state (``method.state_dict()``) and meta.json (with the state's sha256) into a temporary
        folder, then rename it into place. Without ``keep_states`` the previous task's state goes."""
        with self._writing(t) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(tmp / STATE))
            meta["state_sha256"] = file_sha256(tmp / STATE)  # checked before the state is trusted again
            (tmp / META).write_text(json.dumps(meta, indent=1))
        prev = self.task_dir(t - 1) / STATE
        if not self.keep_states and prev.exists():  # only the last state is needed to resume; every meta.json stays
            prev.unlink()

    # ---------------------------------------------------------------- what is done
    def finished(self, n_tasks: int) -> dict[int, dict]:
        """Task -> meta.json of the tasks whose results stand (the rest are trained)."""
        if self.keep_states:
            return {t: meta for t in range(1, n_tasks + 1) if (meta := self.intact_meta(t)) is not None}
        return {t: self.read_meta(t) for t in range(1, self.resume_point(n_tasks) + 1)}

    def intact_meta(self, t: int) -> dict | None:
        """Task ``t``'s meta.json when its meta reads and its state is intact; None when it must be trained (a
        checkpoint that fails its check is reported with a warning naming the file)."""
        if not self.has_meta(t):
            return None
        try:
            meta = self.read_meta(t)
        except UserError as e:
            log.warning("%s; training task %d again", e, t)
            return None
        problem = state_problem(self.task_dir(t) / STATE, meta.get("state_sha256"))
        if problem:
            log.warning("%s: corrupt checkpoint (%s); training task %d again from task %d", self.task_dir(t) / STATE,
                        problem, t, t - 1)
            return None
        return meta

    def resume_point(self, n_tasks: int) -> int:
        """Tasks done when only the last state is kept: the finished prefix (readable meta.json), cut back to the
        latest task whose state is intact when training must continue from it (earlier states are not kept)."""
        done = 0
        while done < n_tasks and self.has_meta(done + 1):
            try:
                self.read_meta(done + 1)
            except UserError as e:
                log.warning("%s; training from task %d again", e, done + 1)
                break
            done += 1
        if done == n_tasks:
            return done  # every task's results are in its meta.json: no state is loaded
        start = done
        while done > 0:
            problem = self.state_problem(done)
            if problem is None:
                break
            if problem != "missing":
                log.warning("%s: corrupt checkpoint (%s)", self.task_dir(done) / STATE, problem)
            done -= 1
        if done < start:
            log.warning("training again from task %d (the state of task %d is the latest intact one; earlier states "
                        "are not kept)", done + 1, done)
        return done


# ------------------------------------------------------------------------------------------- run spec
class BaseRunSpec:
    """Everything that identifies one continual run (benchmark x n_tasks x method x seed); a track sets the
    attributes below in its ``__init__`` and fills the hooks."""

    keep_states: ClassVar[bool] = True  # keep every task's state (False: only the last one)
    method_cls: type
    settings: object
    seed: int
    n_tasks: int
    device: str
    ds: object  # the dataset, with a ``name``
    train_tasks: list  # the tasks trained in order (a track's task objects, with ``index``)

    # ---------------------------------------------------------------- hooks
    def identity(self) -> dict:
        """What the checkpoint fingerprint hashes: method, settings, seed, the task sequence, the backbone's files."""
        raise NotImplementedError

    def run_info(self) -> dict:
        """The readable record written to the checkpoint folder's ``run.json``."""
        raise NotImplementedError

    def new_method(self):
        """The method on a freshly loaded backbone."""
        raise NotImplementedError

    def task_trainer(self) -> Callable:
        """A function ``(method, task) -> meta`` training one task (and evaluating it, where the track does),
        made once per run so it can hold the run's data."""
        raise NotImplementedError

    def task_label(self, task) -> str:
        return str(task.index)

    def result_note(self, meta: dict) -> str:
        """More of a finished task's log line (the classification track: its accuracies)."""
        return ""

    def reusable_prefix(self, folder: Path) -> int:
        """How many leading tasks another run, whose checkpoint folder is ``folder``, trained exactly as this run
        would (see the module docstring); 0 (the default) where a track does not share states between runs."""
        return 0

    # ---------------------------------------------------------------- shared
    def fingerprint(self) -> str:
        return config_hash(self.identity())

    def checkpoint_dir(self, ckpt_root: str | Path) -> Path:
        """This run's checkpoint folder under ``ckpt_root`` (created, with ``run.json``)."""
        d = Path(ckpt_root) / self.fingerprint()
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "run.json").exists():
            atomic_write_json(d / "run.json", self.run_info())
        return d

    def name(self) -> str:
        """The run, as the result folders name it: ``<benchmark data>/T<n>/<method>/seed<s>``."""
        return f"{self.ds.name}/T{self.n_tasks}/{self.method_cls.name}/seed{self.seed}"

    def restore(self, ckpt_dir: str | Path, tasks_done: int):
        """A method whose model is in the state after ``tasks_done`` tasks (the state's sha256 checked)."""
        method = self.new_method()
        if tasks_done > 0:
            state = Checkpoints(ckpt_dir).load_state(tasks_done, device=self.device)
            method.load_state(state, self.train_tasks[:tasks_done])
        return method


def reuse_states(spec: BaseRunSpec, ckpt: Checkpoints, candidates: Iterable[str | Path]) -> int:
    """Copy into ``ckpt`` the leading task states that other runs (their checkpoint folders, ``candidates``) trained
    exactly as ``spec`` would, longest shared prefix first, where ``ckpt`` has no intact state of that task.
    Returns the number of leading tasks that now stand (trained here before, or copied)."""
    n = len(spec.train_tasks)
    own = ckpt.root.resolve()
    shared = sorted(((min(spec.reusable_prefix(Path(c)), n), Path(c)) for c in candidates
                     if Path(c).resolve() != own), key=lambda kc: -kc[0])
    done = 0
    while done < n and ckpt.intact_meta(done + 1) is not None:
        done += 1
    for k, folder in shared:
        src = Checkpoints(folder)
        while done < k:
            meta = src.intact_meta(done + 1)
            if meta is None:
                break
            try:
                ckpt.adopt(done + 1, src, meta)
            except UserError as e:
                log.warning("%s; training it instead", e)
                break
            log.info("task %d: state reused from %s (same method, settings, seed and backbone; its sequence shares "
                     "the first %d tasks)", done + 1, src.task_dir(done + 1), k)
            done += 1
    return done


def train_sequence(spec: BaseRunSpec, ckpt_root: str | Path, stop_after: int | None = None,
                   reuse: Iterable[str | Path] = ()) -> list[dict]:
    """Train every task of ``spec`` in order, skipping tasks whose checkpoints stand; returns every task's meta.
    ``reuse``: other runs' checkpoint folders whose shared leading states are copied first (:func:`reuse_states`).
    ``stop_after``: return after that many tasks (tests use it to simulate a killed run)."""
    ckpt = Checkpoints(spec.checkpoint_dir(ckpt_root), keep_states=spec.keep_states)
    if reuse:
        reuse_states(spec, ckpt, reuse)
    finished = ckpt.finished(len(spec.train_tasks))
    train_task = spec.task_trainer()
    metas = []
    for task in spec.train_tasks:
        t = task.index
        if t in finished:
            metas.append(finished[t])
            log.info("task %s: checkpoint found, skipping", spec.task_label(task))
            continue
        if t > 1:
            log.info("task %d: resuming from the checkpoint of task %d", t, t - 1)
        method = spec.restore(ckpt.root, t - 1)
        try:
            meta = train_task(method, task)
        except FloatingPointError as e:  # nothing of this task is saved: a rerun starts it again
            raise FloatingPointError(f"run {spec.name()} ({ckpt.root}): {e}; task {t} was not saved") from None
        loss = (f"loss {meta['loss_first']:.4f} -> {meta['loss_last']:.4f}" if meta["loss_first"] is not None
                else "no optimizer steps")
        log.info("task %s: %s in %.1fs%s", spec.task_label(task), loss, meta["seconds"], spec.result_note(meta))
        ckpt.save(t, method, meta)
        metas.append(meta)
        if stop_after is not None and len(metas) >= stop_after:
            break
    return metas


# ------------------------------------------------------------------------------------------- one task
class TaskLoop:
    """One task's optimization, the part every track shares: after ``method.begin_task`` the track builds its
    optimizer over ``method.param_groups()`` and calls :meth:`step` once per optimizer step with that step's
    batch(es); :meth:`finish` ends the task (``method.end_task``) and returns the task's record."""

    def __init__(self, method, task, opt: torch.optim.Optimizer, groups: list[dict], *, device: str,
                 precision: str = "bf16", max_grad_norm: float = 0.0, total_steps: int = 0, desc: str = "",
                 started: float | None = None):
        self.method, self.task, self.opt = method, task, opt
        self.params = [p for grp in groups for p in grp["params"]]
        self.amp = amp_context(device, precision)
        self.max_grad_norm = max_grad_norm
        self.losses: list[float] = []
        self.t0 = time.time() if started is None else started  # the task's seconds count from here
        self.bar = progress(total=total_steps, desc=desc)

    def step(self, batches: Iterable[dict], where: str, accum: int = 1) -> float:
        """One optimizer step: ``method.loss`` on each batch (``accum`` of them, their losses divided by ``accum``;
        ``batches`` may be a generator, drawn as it goes), backward, gradient clipping, the update. A non-finite loss
        raises FloatingPointError naming the loss, the task and ``where`` (the step)."""
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            with self.amp():
                out = self.method.loss(batch)
            loss = out["loss"] / accum if accum > 1 else out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"method {self.method.name}: non-finite loss {loss.item()} at task "
                                         f"{self.task.index} {where} ({ {k: float(v) for k, v in out.items()} })")
            loss.backward()
            total += loss.item()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.losses.append(total)
        self.bar.update(1)
        return total

    def show_loss(self, window: int) -> None:
        self.bar.set_postfix(loss=f"{np.mean(self.losses[-window:]):.4f}")

    def finish(self, first: int, last: int) -> dict:
        """End the task; its record: mean loss of the ``first`` / ``last`` steps, N_train, N_store, seconds."""
        self.bar.close()
        if not self.losses and self.params:
            raise FloatingPointError(f"method {self.method.name}: no training step at task {self.task.index}")
        n_trained = self.method.n_trained()
        self.method.end_task(self.task)
        # a task with nothing to train (a prototype or closed-form classifier) has no loss: null in its meta.json
        mean = (lambda xs: float(np.mean(xs))) if self.losses else (lambda xs: None)
        return {"loss_first": mean(self.losses[:first]), "loss_last": mean(self.losses[-last:]),
                "N_train": int(n_trained), "N_store": int(self.method.n_stored()),
                "seconds": round(time.time() - self.t0, 1)}
