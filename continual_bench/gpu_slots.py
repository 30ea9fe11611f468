"""One GPU per job on a multi-GPU machine: Snakemake limits how many GPU jobs run (``--resources gpu=N``)
but never says *which* GPU a job gets, and never sets ``CUDA_VISIBLE_DEVICES``.

The workflow (``workflow/rules/common.smk``) exports ``CONTINUAL_BENCH_GPU_SLOTS=N`` to every job of a
local run with N GPU slots (``--resources gpu=N``, or the machine's GPU count). A command that uses the GPU
(train, generate, noise-floor, train-cls: ``gpu=True`` in cli.py) calls :func:`acquire_gpu_slot` before CUDA is
initialised: it takes the first free slot by an exclusive ``flock`` on ``<locks>/gpu<i>.lock`` (a folder of this machine's temporary
directory unless ``CONTINUAL_BENCH_GPU_LOCKS`` names another; held until the process exits, released by the
kernel even when the job is killed) and sets ``CUDA_VISIBLE_DEVICES`` to that GPU. With Snakemake's limit
equal to the number of slots a slot is always free; otherwise the command waits for one. When the job
already sees a restricted set of GPUs (``CUDA_VISIBLE_DEVICES`` set by the user), slot ``i`` is the
``i``-th of those. Inside a SLURM job nothing is done: SLURM gives the job its own GPUs.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("continual_bench")

_HELD: list = []  # open lock files of this process (kept open: closing releases the lock)


def acquire_gpu_slot(poll: float = 2.0, timeout: float | None = None) -> str | None:
    """Pin this process to one free GPU slot (see the module docstring); return the device id, or None."""
    n = os.environ.get("CONTINUAL_BENCH_GPU_SLOTS", "").strip()
    if not n.isdigit() or int(n) < 1 or os.environ.get("SLURM_JOB_ID"):
        return None
    n = int(n)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible[:n] if visible else [str(i) for i in range(n)]
    locks = Path(os.environ.get("CONTINUAL_BENCH_GPU_LOCKS")
                 or Path(tempfile.gettempdir()) / f"continual-bench-gpu-slots-{os.getuid()}")
    locks.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while True:
        for i, device in enumerate(devices):
            f = open(locks / f"gpu{i}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            _HELD.append(f)
            os.environ["CUDA_VISIBLE_DEVICES"] = device
            log.info("GPU slot %d of %d: CUDA_VISIBLE_DEVICES=%s", i, n, device)
            return device
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no free GPU slot among {n} in {locks} after {timeout:.0f} s")
        time.sleep(poll)
