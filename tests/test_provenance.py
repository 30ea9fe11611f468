"""Provenance columns: ``git_commit``'s "-dirty" looks at the code only; ``weights`` fingerprints model files."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from continual_bench.utils import git_commit, provenance, weights_fingerprint


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(root)})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dirty_means_the_code_differs_from_the_commit(tmp_path):
    (tmp_path / "continual_bench").mkdir()
    (tmp_path / "continual_bench" / "x.py").write_text("a = 1\n")
    (tmp_path / "README.md").write_text("numbers\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.csv").write_text("mean\n1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    clean = git_commit(tmp_path)
    assert len(clean) == 12 and "dirty" not in clean
    # a result or the README being rewritten (tables, findings) does not change what the code computes
    (tmp_path / "README.md").write_text("new numbers\n")
    (tmp_path / "results" / "summary.csv").write_text("mean\n2\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "continual_bench" / "x.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
    assert git_commit(tmp_path / "nowhere") == "unknown"


def test_weights_fingerprint_follows_the_bytes(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    (model / "config.json").write_text("{}")  # not weights: a config edit is the config hash's business
    fp = weights_fingerprint(model)
    assert len(fp) == 12 and int(fp, 16) >= 0
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    (copy / "config.json").write_text('{"x": 1}')
    assert weights_fingerprint(copy) == fp  # the same bytes wherever they lie
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert weights_fingerprint(copy) != fp  # one byte of one weight
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    (moved / "unet" / "diffusion_pytorch_model.safetensors").rename(moved / "unet" / "other.safetensors")
    assert weights_fingerprint(moved) != fp  # the same bytes under another name: another model layout
    single = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights_fingerprint(single) == weights_fingerprint(single) != fp
    assert weights_fingerprint(None) == "none" and weights_fingerprint(tmp_path / "empty_dir_missing") == "unknown"


def test_provenance_weights_column():
    prov = provenance({"a": 1}, weights={"backbone": "0123456789ab", "judge": "ba9876543210", "oracle": "none"})
    assert prov["weights"] == "backbone=0123456789ab;judge=ba9876543210;oracle=none"
    assert "weights" not in provenance({"a": 1})
    assert provenance({"a": 1})["config_hash"] == provenance({"a": 1}, weights={})["config_hash"]
