"""Shared fixtures: tiny worlds and a tiny random-weight pipeline (seconds to build)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# hermetic caches for anything a test imports
for var, sub in (("HF_HOME", "huggingface"), ("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "xdg"),
                 ("MPLCONFIGDIR", "matplotlib")):
    os.environ.setdefault(var, str(REPO / ".cache" / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CONTINUAL_BENCH_NO_TQDM", "1")
torch.set_num_threads(1)

# No test reaches the network beyond this machine: the fake archives name real hosts (the real layouts), and the
# fetchers rewrite them to the 127.0.0.1 mirror; a connection anywhere else fails loudly instead of leaking out.
_LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost"}
_connect = socket.socket.connect


def _local_only_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL_HOSTS:
        raise ConnectionRefusedError(f"tests may only connect to 127.0.0.1, not {address[0]!r}")
    return _connect(self, address)


socket.socket.connect = _local_only_connect


def pytest_configure(config):
    """Tests that do not use a live cluster get a ``scontrol`` that fails at once.

    Every Snakemake start imports the SLURM executor plugin, which runs ``scontrol show config`` at import
    (snakemake_executor_plugin_slurm.job_status_query.get_min_job_age, 10 s timeout) only to word a help text. On a
    machine with SLURM's client installed but no controller running (the CI machine, where tools/slurm-local.sh
    starts one only for the live test) each start waited 9 s for it: ~6 of the suite's 10 minutes. Without a
    ``scontrol`` at all the plugin skips the question, as it does here. The live SLURM test (``-m slurm``,
    CONTINUAL_BENCH_SLURM=1) keeps the real one.
    """
    if os.environ.get("CONTINUAL_BENCH_SLURM") == "1" or "slurm" in (config.option.markexpr or "").replace(
            "not slurm", ""):
        return
    import atexit
    import shutil
    import tempfile

    shim = Path(tempfile.mkdtemp(prefix="continual-bench-no-scontrol-"))
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    tool = shim / "scontrol"
    tool.write_text("#!/bin/sh\necho 'scontrol: not available to this test (tests/conftest.py)' >&2\nexit 1\n")
    tool.chmod(0o755)
    os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from continual_bench.data.toy import write_world

    root = tmp_path_factory.mktemp("world")
    write_world("toy_faces", root / "toy_faces", seed=0, n_concepts=4, n_train=6, n_eval=4, n_generic=24,
                n_generic_ids=12)
    return root / "toy_faces"


@pytest.fixture(scope="session")
def tiny_cfg():
    from continual_bench.backbones.t2i import ToyT2IConfig

    return ToyT2IConfig(vae_channels=(8, 16), latent_channels=4, attention_max_resolution=8, text_width=32,
                        text_layers=1, text_heads=2, unet_channels=(32, 32),
                        attention_head_dim=16)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from continual_bench.backbones.t2i import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("tok"), model_max_length=16)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_cfg, tokenizer_dir) -> Path:
    """A random-weight toy StableDiffusionPipeline saved with save_pretrained."""
    from continual_bench.backbones import t2i

    torch.manual_seed(0)
    tok = t2i.load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("pipe") / "sd"
    t2i.save_pipeline(t2i.build_toy_vae(tiny_cfg), t2i.build_toy_text_encoder(tiny_cfg, tok), tok,
                      t2i.build_toy_unet(tiny_cfg, 16), out)
    return out
