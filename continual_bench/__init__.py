"""continual-bench: a reproducible benchmark suite for continual learning with pretrained generative and
vision models (Continual Diffusion and rehearsal-free class-incremental classification)."""

__version__ = "0.1.0"
