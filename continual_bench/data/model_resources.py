"""Pretrained models of the paper profile as local resources (``data_manifests/models.yaml``).

:func:`fetch_model` fetches one model's files into ``<resources>/<name>/``, turns them into the local format
the code loads, and writes ``fetched.json`` last (the workflow's output). Models on the Hugging Face Hub (a
``repo_id`` in models.yaml) are fetched with ``huggingface_hub`` (:func:`fetch_hf_files`: revision, token,
retries, progress bars and ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` come with it) at a **pinned commit**: a branch or
tag is refused unless ``allow_unpinned``, and then resolved once and locked in ``revision.lock.json``. Every
file's sha256 is checked against the hub's LFS sha256 when it announces one and recorded in (or verified
against) ``checksums.lock.json``. Other models use the dataset fetcher (verified, resumable, checksum-locked).
``offline`` (or ``HF_HUB_OFFLINE=1`` for hub models) downloads nothing: it verifies what is there against the
locks and names what is missing.

* ``diffusers`` (Stable Diffusion): the files already are a ``save_pretrained`` folder; loading it offline
  is :func:`continual_bench.backbones.t2i.load_pipeline`.
* ``open_clip_openai`` (CLIP ViT-B/32): OpenAI's JIT checkpoint becomes an open_clip ``local-dir``
  (``open_clip_config.json`` + ``open_clip_model.safetensors``), the judge's format.
* ``inception_weights``: torch-fidelity's InceptionV3 weights, used as they are.
* ``timm`` (ViT-B/16): ``model.safetensors`` + timm's ``config.json``, as
  :func:`continual_bench.backbones.vit.load_vit` reads them.

:func:`build_paper_judge` puts the converted CLIP and the Inception weights into one judge folder with a
``judge.json`` that tells :func:`continual_bench.evaluation.judge.load_judge` to compute KID on Inception
features (as the papers do) and the CLIP metrics on CLIP features.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..utils import UserError, atomic_write_json
from .manifests import ModelSpec, load_models

log = logging.getLogger("continual_bench")

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
JUDGE_FILE = "judge.json"
REVISION_LOCK = "revision.lock.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def fetch_model(name: str, resources: str | Path, *, offline: bool = False, base_url: str | None = None,
                models_file: str | Path | None = None, allow_unpinned: bool = False, **kwargs) -> Path:
    """Fetch (or verify, offline) model ``name`` into ``<resources>/<name>/``; return that folder.
    ``allow_unpinned``: accept a Hugging Face revision that is not a commit (see :func:`fetch_hf_files`)."""
    from .fetch import ChecksumLock, fetch_manifest, write_fetch_record

    models = load_models(models_file)
    if name not in models:
        raise UserError(f"unknown model {name!r}; models.yaml lists {', '.join(sorted(models))}")
    spec = models[name]
    out = Path(resources) / name
    lock = ChecksumLock(out / "checksums.lock.json")
    hub: dict = {}
    if spec.repo_id:
        files, hub = fetch_hf_files(spec, out, lock, offline=offline, base_url=base_url, allow_unpinned=allow_unpinned)
    else:
        files = fetch_manifest(spec.as_manifest(), out, lock=lock, offline=offline, base_url=base_url, **kwargs)
    if spec.format == "open_clip_openai":
        (pt,) = files.values()
        convert_openai_clip(pt, out)
    record = out / "fetched.json"
    write_fetch_record(files, record, manifest=spec.as_manifest(), lock=lock)
    data = json.loads(record.read_text())
    data.update({"revision": spec.revision, "format": spec.format, **hub})
    atomic_write_json(record, data)
    return out


def _hub_error(where: str, exc: BaseException) -> UserError:
    """A one-line UserError for an exception of huggingface_hub (or the network below it)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, GatedRepoError) or getattr(getattr(exc, "response", None), "status_code", None) == 401:
        hint = "; accept the model's licence on its page and export HF_TOKEN (an access token of that account)"
    elif isinstance(exc, RevisionNotFoundError):
        hint = "; check the revision in models.yaml"
    elif isinstance(exc, RepositoryNotFoundError):
        hint = "; check repo_id in models.yaml (a gated or private repository also answers this way without HF_TOKEN)"
    else:
        hint = ""
    return UserError(f"{where}: {type(exc).__name__}: {text}{hint}")


def _read_revision_lock(path: Path, repo_id: str, revision: str) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = data.get("repo_id") == repo_id and data.get("revision") == revision
    return data["commit"] if ok and _COMMIT.fullmatch(str(data.get("commit"))) else None


def fetch_hf_files(spec: ModelSpec, out: Path, lock, *, offline: bool = False, base_url: str | None = None,
                   allow_unpinned: bool = False) -> tuple[dict[str, Path], dict]:
    """Fetch ``spec``'s files from the Hugging Face Hub into ``out`` with ``huggingface_hub``; return
    ``({path: local file}, {"repo_id", "commit", "hub_etag"})`` for the fetch record.

    * Pinning: ``spec.revision`` must be a commit hash. A branch or tag (``main``) is refused unless
      ``allow_unpinned``; then the first fetch resolves it (the hub's ``X-Repo-Commit``), fetches every file from
      that one commit and writes ``out/revision.lock.json``, which later fetches reuse, so the files never come
      from two commits and never silently change.
    * A file already at ``out/<path>`` that matches ``lock`` costs no request. Otherwise ``hf_hub_download``
      (``local_dir=out``) fetches it; its sha256 must equal the hub's LFS sha256 (the ``ETag`` of an LFS file)
      when the hub announces one, and is recorded in ``lock`` on first download and verified on every later one.
    * ``offline`` or ``HF_HUB_OFFLINE=1``: nothing is requested; every file must be present and match ``lock``.
    * ``base_url``: the hub endpoint is ``<base_url>/huggingface.co`` (the tests' 127.0.0.1 mirror); otherwise
      ``HF_ENDPOINT`` or huggingface.co. ``HF_TOKEN`` is sent by huggingface_hub to that endpoint.
    """
    from huggingface_hub import constants as hf_constants

    from .fetch import fetch_manifest, verify_checksums

    where = f"{spec.source or 'models.yaml'}: models.{spec.name}"
    repo, revision = spec.repo_id, spec.revision
    rev_lock = out / REVISION_LOCK
    pinned = bool(_COMMIT.fullmatch(revision))
    if not pinned and not allow_unpinned:
        raise UserError(f"{where}: revision {revision!r} of {repo} is a branch or tag, not a commit, so the weights "
                        f"behind it can change; write the commit hash (https://huggingface.co/{repo}/commits/{revision})"
                        " into revision and the files' URLs, or allow it with paper.allow_unpinned_models: true "
                        f"(--allow-unpinned), which locks the commit it resolves to in {rev_lock}")
    commit = revision if pinned else _read_revision_lock(rev_lock, repo, revision)
    if offline or hf_constants.HF_HUB_OFFLINE:
        try:
            files = fetch_manifest(spec.as_manifest(), out, lock=lock, offline=True)
        except UserError as exc:
            if offline:
                raise
            raise UserError(f"{exc} (HF_HUB_OFFLINE=1 is set: unset it to download)") from None
        return files, {"repo_id": repo, "commit": commit}
    if not pinned:
        log.warning("%s: revision %r is not a commit (allowed); %s", where, revision,
                    f"using the locked commit {commit}" if commit else "resolving it once and locking the commit")
    endpoint = f"{base_url.rstrip('/')}/huggingface.co" if base_url else None
    files, etags = {}, {}
    for entry in spec.files:
        dest = out / entry.path
        expected = entry.sha256 or lock.get(entry.path)
        if dest.is_file() and expected:
            try:
                verify_checksums(dest, sha256=expected)
                log.info("%s: already here, sha256 ok", dest)
                files[entry.path] = dest
                continue
            except UserError as exc:
                log.warning("%s; downloading it again", exc)
                dest.unlink()
        etags[entry.path], commit = _fetch_hf_file(spec, entry, out, lock, commit=commit, endpoint=endpoint)
        files[entry.path] = dest
    return files, {"repo_id": repo, "commit": commit, "hub_etag": etags}


def _fetch_hf_file(spec: ModelSpec, entry, out: Path, lock, *, commit: str | None, endpoint: str | None):
    """Download one file of ``spec`` at ``commit`` (None: resolve ``spec.revision`` now and lock it in
    ``out/revision.lock.json``) and verify it (see :func:`fetch_hf_files`); return (its ETag, the commit)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    from .fetch import sha256_file

    where = f"{spec.source or 'models.yaml'}: models.{spec.name}"
    repo, revision, dest = spec.repo_id, spec.revision, out / entry.path
    at = f"{where}: {repo}@{commit or revision}/{entry.path}"
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, entry.path, revision=commit or revision, endpoint=endpoint))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub and httpx errors: one line naming the file
        raise _hub_error(at, exc) from None
    if commit is None:
        if not (meta.commit_hash and _COMMIT.fullmatch(meta.commit_hash)):
            raise UserError(f"{at}: the hub did not name the commit of {revision!r} (X-Repo-Commit)")
        commit = meta.commit_hash
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / REVISION_LOCK, {"repo_id": repo, "revision": revision, "commit": commit})
        log.warning("%s: %r resolved to commit %s, locked in %s", where, revision, commit, out / REVISION_LOCK)
    elif meta.commit_hash != commit:
        raise UserError(f"{at}: the hub answered commit {meta.commit_hash}, expected {commit}")
    try:
        hf_hub_download(repo, entry.path, revision=commit, local_dir=out, endpoint=endpoint)  # its own progress bar
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(at, exc) from None
    actual = sha256_file(dest)
    hub_sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
    wanted = [(name, want) for name, want in (("the hub's LFS sha256", hub_sha), ("models.yaml's sha256", entry.sha256))
              if want]
    for name, want in wanted:
        if actual != want:
            dest.unlink()
            raise UserError(f"{dest}: sha256 {actual} does not match {name} {want} ({at})")
    try:
        lock.verify_or_record(entry.path, dest)
    except UserError:
        dest.unlink()
        raise
    log.info("downloaded %s: %d bytes, sha256 %s", dest, dest.stat().st_size,
             f"ok ({' and '.join(name for name, _ in wanted)})" if wanted else "locked (the hub announced none)")
    return meta.etag, commit


def _openai_model_cfg(sd: dict) -> dict:
    """open_clip's model config of an OpenAI CLIP ViT state dict (as build_model_from_openai_state_dict infers it)."""
    if "visual.proj" not in sd:
        raise UserError("not an OpenAI CLIP ViT checkpoint (no visual.proj); ResNet CLIPs are not supported here")
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(sd["text_projection"].shape[1]),
        "quick_gelu": True,  # OpenAI's models were trained with QuickGELU
        "vision_cfg": {"layers": len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
                       "width": int(width), "patch_size": int(patch), "image_size": int(patch * grid)},
        "text_cfg": {"context_length": int(sd["positional_embedding"].shape[0]),
                     "vocab_size": int(sd["token_embedding.weight"].shape[0]), "width": int(text_width),
                     "heads": int(text_width // 64),
                     "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})},
    }


def convert_openai_clip(checkpoint: str | Path, out: str | Path) -> Path:
    """OpenAI CLIP checkpoint (JIT archive or state dict) -> open_clip local-dir in ``out`` (fp32)."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out)
    try:
        model = open_clip.load_openai_model(str(checkpoint), precision="fp32", device="cpu")
    except (RuntimeError, KeyError, OSError, ValueError) as exc:
        raise UserError(f"{checkpoint}: not a loadable OpenAI CLIP checkpoint ({' '.join(str(exc).split())[:200]})") from None
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg = _openai_model_cfg(sd)
    check = open_clip.CLIP(**cfg)
    missing, unexpected = check.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{checkpoint}: converted weights do not fit the inferred config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out / "open_clip_model.safetensors.tmp"
    save_file(sd, str(tmp))
    os.replace(tmp, out / "open_clip_model.safetensors")
    preprocess = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    atomic_write_json(out / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": preprocess})
    return out


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.linking")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def build_paper_judge(clip_dir: str | Path, inception_dir: str | Path, out: str | Path) -> Path:
    """One judge folder: the open_clip local-dir (hard links) + Inception weights + ``judge.json``."""
    clip_dir, inception_dir, out = Path(clip_dir), Path(inception_dir), Path(out)
    need = [clip_dir / "open_clip_config.json", clip_dir / "open_clip_model.safetensors"]
    weights = sorted(inception_dir.glob("*inception*.pth"))
    for f in need:
        if not f.is_file():
            raise UserError(f"{f}: missing; fetch the CLIP judge first (continual-bench fetch-models --model clip_vit_b_32)")
    if not weights:
        raise UserError(f"{inception_dir}: no Inception weights (*inception*.pth); fetch them first "
                        "(continual-bench fetch-models --model inception_kid)")
    out.mkdir(parents=True, exist_ok=True)
    for f in need + [weights[0]]:
        _link(f, out / f.name)
    atomic_write_json(out / JUDGE_FILE, {"clip": ".", "kid_features": "inception",
                                         "inception_weights": weights[0].name,
                                         "note": "CLIP ViT-B/32 for clip/clip_t; torch-fidelity InceptionV3 "
                                                 "(2048-d pool features) for KID"})
    return out
