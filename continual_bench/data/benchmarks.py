"""Benchmarks the suite knows: which track, which prepared dataset, which class word, which world.

The toy benchmarks mirror the papers' datasets (``mirrors``); the paper profile's datasets are prepared
into the same layout by their fetch/prepare rules.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..utils import UserError


@dataclass(frozen=True)
class Benchmark:
    name: str
    track: str  # "t2i" or "cls"
    world: str  # "toy" or "paper"
    class_word: str = ""  # generic class of the concepts ("person"); never in C-LoRA-style prompts
    mirrors: str = ""  # for toy benchmarks: the real dataset they stand in for
    has_oracle: bool = False  # the toy world can train an oracle on its known concepts


BENCHMARKS = {b.name: b for b in [
    Benchmark("toy_faces", "t2i", "toy", "person", mirrors="celeba_hq", has_oracle=True),
    Benchmark("toy_landmarks", "t2i", "toy", "waterfall", mirrors="gldv2_waterfalls", has_oracle=True),
    Benchmark("toy_imagenet_r", "cls", "toy", mirrors="imagenet_r"),
    Benchmark("celeba_hq", "t2i", "paper", "person"),
    Benchmark("gldv2_waterfalls", "t2i", "paper", "waterfall"),
    Benchmark("imagenet_r", "cls", "paper"),
]}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UserError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}") from None
