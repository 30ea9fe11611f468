"""Celeb-A HQ identities (the text-to-image face benchmark of C-LoRA) in the prepared layout.

Input: the directory ``continual-bench fetch --manifest celeba_hq`` filled (data_manifests/celeba_hq.yaml)::

    <raw>/identity_CelebA.txt                                      "<CelebA file> <identity>" per line
    <raw>/celebamask_hq/CelebAMask-HQ/CelebA-HQ-to-CelebA-mapping.txt   header "idx orig_idx orig_file"
    <raw>/celebamask_hq/CelebAMask-HQ/CelebA-HQ-img/<idx>.jpg      1024 x 1024

Selection (the manifest's rule, audit trail in ``world.json``): image ``idx`` of CelebA-HQ is CelebA's
``orig_file``; its identity is that file's entry in identity_CelebA.txt. Identities with at least
``min_images`` CelebA-HQ images qualify (C-LoRA: "at least 15 training images"). The pool is every
qualifying identity, sorted by identity id (or, with ``pool_size``, that many drawn with
``random.Random(data_seed).sample``); each run draws its ``n_tasks`` celebrities and their order from the
pool with its own seed (engine: ``task_sequence``). An identity's images are taken in CelebA-HQ index
order, at most ``max_images``; the last ``n_eval`` of them are held out as evaluation references (0: all
train, and evaluation compares with the training images). With ``n_eval > 0`` an identity qualifies only with
``min_images + n_eval`` images, so every concept still trains on at least ``min_images`` (C-LoRA's rule) and is
scored against ``n_eval`` real images it never trained on. Generic images ("a photo of a person", the
reference of relevant-concept forgetting and prior images for methods that use them): ``n_generic``
images of identities outside the pool, drawn with ``random.Random(data_seed)``. Everything is resized to
``resolution`` (512, C-LoRA) and saved as PNG. Prompts never name the class (C-LoRA): captions are only
used for CLIP text alignment.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from ..utils import UserError
from .manifests import load_manifest
from .paper import GENERIC, LayoutWriter, class_caption, selection_params, split_images

CLASS_WORD = "person"
MAPPING = "celebamask_hq/CelebAMask-HQ/CelebA-HQ-to-CelebA-mapping.txt"
IMAGES = "celebamask_hq/CelebAMask-HQ/CelebA-HQ-img"
IDENTITIES = "identity_CelebA.txt"
DEFAULTS = {"min_images": 15, "n_concepts": 10, "resolution": 512, "pool_size": None, "max_images": None,
            "n_eval": 0, "n_generic": 200}


def read_identities(path: str | Path) -> dict[str, int]:
    """identity_CelebA.txt: ``{CelebA file name: identity}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; fetch the celeba_hq manifest first (manual download)")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{path}:{n}: expected '<file> <identity>', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def read_mapping(path: str | Path) -> dict[int, str]:
    """CelebA-HQ-to-CelebA-mapping.txt: ``{CelebA-HQ index: CelebA file name}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; is CelebAMask-HQ.zip fully extracted?")
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or lines[0][:3] != ["idx", "orig_idx", "orig_file"]:
        raise UserError(f"{path}: expected a header 'idx orig_idx orig_file'")
    out = {}
    for n, parts in enumerate(lines[1:], start=2):
        if len(parts) != 3 or not parts[0].isdigit():
            raise UserError(f"{path}:{n}: expected '<idx> <orig_idx> <orig_file>', got {' '.join(parts)!r}")
        out[int(parts[0])] = parts[2]
    return out


def images_by_identity(raw: str | Path) -> dict[int, list[int]]:
    """``{identity: sorted CelebA-HQ indices}`` for every identity with a CelebA-HQ image."""
    raw = Path(raw)
    ids = read_identities(raw / IDENTITIES)
    by_id: dict[int, list[int]] = defaultdict(list)
    for idx, orig in read_mapping(raw / MAPPING).items():
        if orig not in ids:
            raise UserError(f"{raw / MAPPING}: CelebA file {orig} (CelebA-HQ image {idx}) has no identity in "
                            f"{raw / IDENTITIES}")
        by_id[ids[orig]].append(idx)
    return {k: sorted(v) for k, v in sorted(by_id.items())}


def select_identities(by_id: dict[int, list[int]], *, min_images: int, pool_size: int | None,
                      data_seed: int, n_eval: int = 0) -> list[int]:
    """The concept pool: qualifying identities (``min_images`` training images + ``n_eval`` held out) sorted by id,
    or ``pool_size`` of them drawn with the data seed."""
    need = min_images + n_eval
    qualifying = sorted(k for k, v in by_id.items() if len(v) >= need)
    if pool_size is None:
        return qualifying
    if pool_size > len(qualifying):
        raise UserError(f"celeba_hq: pool_size={pool_size} but only {len(qualifying)} identities have at least "
                        f"{need} images (min_images {min_images} + n_eval {n_eval})")
    return random.Random(data_seed).sample(qualifying, pool_size)


def prepare_celeba_hq(raw: str | Path, out: str | Path, *, data_seed: int = 0, settings: dict | None = None,
                      manifest: str | Path = "celeba_hq") -> Path:
    """Write the Celeb-A HQ concept pool and generic images into ``out`` (the toy world's layout)."""
    m = load_manifest(manifest)
    p = selection_params(m, settings, DEFAULTS)
    raw = Path(raw)
    by_id = images_by_identity(raw)
    pool = select_identities(by_id, min_images=p["min_images"], pool_size=p["pool_size"], data_seed=data_seed,
                             n_eval=p["n_eval"])
    if len(pool) < p["n_concepts"]:
        raise UserError(f"{raw}: {len(pool)} identities with at least {p['min_images'] + p['n_eval']} images "
                        f"(min_images + n_eval); the benchmark needs {p['n_concepts']}")
    writer = LayoutWriter(out, p["resolution"])
    caption = class_caption(CLASS_WORD)
    concepts = {}
    for identity in pool:
        name = f"celeb_{identity:05d}"
        idxs = by_id[identity][:p["max_images"]]
        for idx, split in split_images(idxs, p["n_eval"]):
            writer.add(raw / IMAGES / f"{idx}.jpg", name, split, caption)
        concepts[name] = {"identity": identity, "celeba_hq_idx": idxs, "n_available": len(by_id[identity])}
    others = [(k, idx) for k, v in by_id.items() if k not in set(pool) for idx in v]
    generic = sorted(random.Random(data_seed).sample(others, min(p["n_generic"], len(others))))
    for _, idx in generic:
        writer.add(raw / IMAGES / f"{idx}.jpg", GENERIC, "train", caption)
    meta = {"name": "celeba_hq", "world": "paper", "class_word": CLASS_WORD, "size": p["resolution"],
            "data_seed": data_seed, "manifest": str(m.source), "selection": {"rule": m.selection_rule, "params": p},
            "n_qualifying": sum(len(v) >= p["min_images"] + p["n_eval"] for v in by_id.values()), "concepts": concepts,
            "generic_celeba_hq_idx": [idx for _, idx in generic]}
    return writer.finish(meta)
