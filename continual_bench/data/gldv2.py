"""Google Landmarks v2 waterfalls (the text-to-image landmark benchmark of C-LoRA): select, fetch, prepare.

Three steps, each a CLI subcommand and a workflow rule, after ``continual-bench fetch --manifest
gldv2_waterfalls`` fetched the metadata (data_manifests/gldv2_waterfalls.yaml):

1. :func:`select_waterfalls` (``select-gldv2-waterfalls``) reads ``metadata/train_label_to_category.csv``
   (landmark_id, Wikimedia Commons category URL) and ``metadata/train.csv`` (id, url, landmark_id) and
   writes ``selection.csv``: every candidate landmark with its name, in draw order, and the images it
   would use. The rule (also in the manifest): the category name (after ``Category:``, URL-decoded, ``_``
   read as a space) matches one of ``patterns`` (default: ``waterfall`` in any case, or the whole word
   ``Falls``), its landmark_id is not in ``exclude``, and it has at least ``min_images`` train images
   (``min_images + n_eval`` when ``n_eval`` images per landmark are held out as evaluation references).
   Candidates are sorted by landmark_id and shuffled with ``random.Random(data_seed)``; each lists its
   first ``max_images`` images by image id.
2. :func:`fetch_waterfall_images` (``fetch-gldv2-images``) downloads only those images, with
   :func:`~continual_bench.data.fetch.download_many`: at most one request per ``min_interval_s`` per
   host, retries with backoff, every image decoded before it is kept, its sha256 recorded in a lock file
   on first download and verified on every later run (which skips what is present, so a rerun resumes).
   Candidates are taken in draw order until ``pool_size`` of them have at least ``min_images`` images
   that came through (dead links are common; a landmark that falls short is skipped and recorded as
   such); then ``generic_per_landmark`` images of each following candidate until ``n_generic`` generic
   waterfall images came through. ``fetched.csv`` records every image's fate.
3. :func:`prepare_gldv2_waterfalls` (``prepare-gldv2-waterfalls``) writes the prepared layout (one folder
   per landmark, ``generic/``, manifest.csv, world.json) at ``resolution`` and ``attribution.csv`` (id,
   url, author, license, title of every image used, from ``metadata/train_attribution.csv``: CC-BY
   requires attribution).

Each run then draws its ``n_tasks`` landmarks and their order from the pool with its own seed.
"""
from __future__ import annotations

import csv
import io
import logging
import random
import re
from pathlib import Path
from urllib.parse import unquote

from ..utils import UserError, atomic_write_text, progress
from .manifests import load_manifest
from .paper import GENERIC, LayoutWriter, class_caption, selection_params, split_images

log = logging.getLogger("continual_bench")

CLASS_WORD = "waterfall"
TRAIN_CSV = "metadata/train.csv"
CATEGORIES_CSV = "metadata/train_label_to_category.csv"
ATTRIBUTION_CSV = "metadata/train_attribution.csv"
DEFAULTS = {"patterns": ["(?i)waterfall", r"\bFalls\b"], "exclude": [], "min_images": 15, "max_images": 50,
            "n_concepts": 10, "pool_size": 10, "min_interval_s": 1.0, "n_generic": 100, "generic_per_landmark": 2,
            "n_eval": 0, "resolution": 512}
SELECTION_COLUMNS = ["rank", "landmark_id", "name", "n_images", "id", "url"]
FETCHED_COLUMNS = ["rank", "landmark_id", "name", "id", "path", "role", "status"]


def _reader(path: Path, columns: list[str]):
    if not path.is_file():
        raise UserError(f"{path}: missing; fetch the gldv2_waterfalls manifest first")
    f = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        f.close()
        raise UserError(f"{path}: missing column(s) {missing}; expected {columns}")
    return f, reader


def category_name(category: str) -> str:
    """``http://commons.wikimedia.org/wiki/Category:Niagara_Falls`` -> ``Niagara Falls``."""
    return unquote(category.rsplit("Category:", 1)[-1]).replace("_", " ").strip()


def image_path(image_id: str) -> str:
    """GLDv2's own layout: ``images/<a>/<b>/<c>/<id>.jpg`` from the id's first three characters."""
    if not re.fullmatch(r"[0-9A-Za-z]{3,}", image_id):
        raise UserError(f"unexpected GLDv2 image id {image_id!r}")
    return f"images/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _params(settings: dict | None, manifest) -> dict:
    return selection_params(load_manifest(manifest), settings, DEFAULTS)


def select_waterfalls(raw: str | Path, out_csv: str | Path, *, data_seed: int = 0, settings: dict | None = None,
                      manifest: str | Path = "gldv2_waterfalls") -> list[int]:
    """Write ``selection.csv`` (see the module docstring); return the candidates' landmark ids in draw order."""
    p = _params(settings, manifest)
    raw = Path(raw)
    try:
        patterns = [re.compile(x) for x in p["patterns"]]
    except re.error as exc:
        raise UserError(f"gldv2_waterfalls: bad pattern in 'patterns' ({exc})") from None
    exclude = {int(x) for x in p["exclude"]}
    names: dict[int, str] = {}
    f, reader = _reader(raw / CATEGORIES_CSV, ["landmark_id", "category"])
    with f:
        for row in reader:
            name = category_name(row["category"])
            lid = int(row["landmark_id"])
            if lid not in exclude and any(rx.search(name) for rx in patterns):
                names[lid] = name
    images: dict[int, list[tuple[str, str]]] = {lid: [] for lid in names}
    f, reader = _reader(raw / TRAIN_CSV, ["id", "url", "landmark_id"])
    with f:
        for row in reader:
            lid = int(row["landmark_id"])
            if lid in images:
                images[lid].append((row["id"], row["url"]))
    need = p["min_images"] + p["n_eval"]  # training images + held-out references per concept
    candidates = sorted(lid for lid, imgs in images.items() if len(imgs) >= need)
    random.Random(data_seed).shuffle(candidates)
    if len(candidates) < p["pool_size"]:
        raise UserError(f"{raw / CATEGORIES_CSV}: {len(candidates)} waterfall landmarks with at least "
                        f"{need} images (min_images + n_eval); pool_size is {p['pool_size']}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SELECTION_COLUMNS, lineterminator="\n")
    w.writeheader()
    for rank, lid in enumerate(candidates):
        imgs = sorted(images[lid])
        for image_id, url in imgs[:p["max_images"]]:
            w.writerow({"rank": rank, "landmark_id": lid, "name": names[lid], "n_images": len(imgs), "id": image_id,
                        "url": url})
    atomic_write_text(out_csv, buf.getvalue())
    log.info("gldv2: %d waterfall candidates (%d matched a pattern)", len(candidates), len(names))
    return candidates


def _read_selection(path: Path) -> list[tuple[int, int, str, list[tuple[str, str]]]]:
    """[(rank, landmark_id, name, [(id, url), ...])] in rank order."""
    groups: dict[int, tuple[int, str, list]] = {}
    f, reader = _reader(path, SELECTION_COLUMNS)
    with f:
        for row in reader:
            g = groups.setdefault(int(row["rank"]), (int(row["landmark_id"]), row["name"], []))
            g[2].append((row["id"], row["url"]))
    return [(rank, lid, name, imgs) for rank, (lid, name, imgs) in sorted(groups.items())]


def _present(rels: dict[str, str], root: Path, lock) -> "object":
    """Offline stand-in for download_many: the files already there (and matching the lock)."""
    from .fetch import BatchResult

    res = BatchResult()
    for rel in rels:
        dest = root / rel
        if not dest.is_file():
            res.failed[rel] = f"{dest}: missing (offline)"
            continue
        try:
            lock.verify_or_record(rel, dest)
        except UserError as exc:
            res.failed[rel] = str(exc)
            continue
        res.ok[rel] = dest
    return res


def fetch_waterfall_images(raw: str | Path, selection_csv: str | Path, out_csv: str | Path, *,
                           settings: dict | None = None, manifest: str | Path = "gldv2_waterfalls",
                           lock: str | Path | None = None, base_url: str | None = None, offline: bool = False,
                           retries: int = 3, timeout: float = 30.0, backoff: float = 2.0) -> dict[str, int]:
    """Download the selected images under ``raw`` (see the module docstring); write ``fetched.csv``. A progress bar
    counts the images; a log line per landmark says how many came through and how far the pool is."""
    from .fetch import ChecksumLock, download_many, mirror_url

    p = _params(settings, manifest)
    raw = Path(raw)
    chk = ChecksumLock(lock or raw / "images.lock.json")
    rows, pool, n_generic = [], [], 0
    bar = progress(unit="image", desc="gldv2 images")

    def fetch(imgs):
        rels = {image_path(i): mirror_url(u, base_url) for i, u in imgs}
        if offline:
            bar.update(len(rels))
            return _present(rels, raw, chk)
        return download_many(rels, raw, chk, images=True, min_interval=p["min_interval_s"], retries=retries,
                             timeout=timeout, backoff=backoff, bar=bar)

    for rank, lid, name, imgs in _read_selection(Path(selection_csv)):
        if len(pool) < p["pool_size"]:
            res = fetch(imgs)
            role = "concept" if len(res.ok) >= p["min_images"] + p["n_eval"] else "short"
            if role == "concept":
                pool.append(lid)
            else:
                log.warning("gldv2: landmark %d (%s): %d of %d images came through (< %d); skipped", lid, name,
                            len(res.ok), len(imgs), p["min_images"] + p["n_eval"])
        elif n_generic < p["n_generic"]:
            take = imgs[:min(p["generic_per_landmark"], p["n_generic"] - n_generic)]
            res, role = fetch(take), GENERIC
            n_generic += len(res.ok)
            imgs = take
        else:
            break
        if role != "short":
            log.info("gldv2: landmark %d (%s): %d of %d images came through; pool %d/%d, generic %d/%d", lid, name,
                     len(res.ok), len(imgs), len(pool), p["pool_size"], n_generic, p["n_generic"])
        for image_id, _ in imgs:
            rel = image_path(image_id)
            status = "ok" if rel in res.ok else res.failed.get(rel, "not fetched")
            rows.append({"rank": rank, "landmark_id": lid, "name": name, "id": image_id, "path": rel, "role": role,
                         "status": " ".join(status.split())})
    bar.close()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FETCHED_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    if len(pool) < p["pool_size"]:
        atomic_write_text(Path(out_csv).with_suffix(".incomplete.csv"), buf.getvalue())
        raise UserError(f"{selection_csv}: only {len(pool)} of {p['pool_size']} waterfall landmarks have at least "
                        f"{p['min_images']} images that came through (details: "
                        f"{Path(out_csv).with_suffix('.incomplete.csv')}); run again to retry the failed images"
                        + (" without offline" if offline else ""))
    atomic_write_text(out_csv, buf.getvalue())
    return {"concepts": len(pool), "generic": n_generic, "images": sum(r["status"] == "ok" for r in rows)}


def _attribution(raw: Path, ids: set[str]) -> dict[str, dict]:
    path = raw / ATTRIBUTION_CSV
    f, reader = _reader(path, ["id", "url", "author", "license", "title"])
    out = {}
    with f:
        for row in reader:
            if row["id"] in ids:
                out[row["id"]] = {k: row[k] for k in ("id", "url", "author", "license", "title")}
    return out


def prepare_gldv2_waterfalls(raw: str | Path, fetched_csv: str | Path, out: str | Path, *, data_seed: int = 0,
                             settings: dict | None = None, manifest: str | Path = "gldv2_waterfalls") -> Path:
    """Write the fetched waterfalls into ``out`` in the toy world's layout, with ``attribution.csv``."""
    m = load_manifest(manifest)
    p = selection_params(m, settings, DEFAULTS)
    raw, out = Path(raw), Path(out)
    concepts: dict[int, dict] = {}
    generic: list[tuple[str, str]] = []
    f, reader = _reader(Path(fetched_csv), FETCHED_COLUMNS)
    with f:
        for row in reader:
            if row["status"] != "ok":
                continue
            if row["role"] == "concept":
                c = concepts.setdefault(int(row["landmark_id"]), {"name": row["name"], "rank": int(row["rank"]),
                                                                  "images": []})
                c["images"].append((row["id"], row["path"]))
            elif row["role"] == GENERIC:
                generic.append((row["id"], row["path"]))
    if len(concepts) < p["n_concepts"]:
        raise UserError(f"{fetched_csv}: {len(concepts)} landmarks came through; the benchmark needs {p['n_concepts']}")
    used = {i for c in concepts.values() for i, _ in c["images"]} | {i for i, _ in generic}
    credits = _attribution(raw, used)
    missing = sorted(used - set(credits))
    if missing:
        raise UserError(f"{raw / ATTRIBUTION_CSV}: no attribution for image {missing[0]} ({len(missing)} images "
                        "lack one); CC-BY images cannot be used without it")
    writer = LayoutWriter(out, p["resolution"])
    caption = class_caption(CLASS_WORD)
    attribution = []
    meta_concepts = {}
    for lid, c in sorted(concepts.items(), key=lambda kv: kv[1]["rank"]):
        name = f"landmark_{lid}"
        for (image_id, rel), split in split_images(c["images"], p["n_eval"]):
            written = writer.add(raw / rel, name, split, caption)
            attribution.append({"path": written, **credits[image_id]})
        meta_concepts[name] = {"landmark_id": lid, "category": c["name"], "rank": c["rank"],
                               "image_ids": [i for i, _ in c["images"]]}
    for image_id, rel in generic:
        written = writer.add(raw / rel, GENERIC, "train", caption)
        attribution.append({"path": written, **credits[image_id]})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "id", "url", "author", "license", "title"], lineterminator="\n")
    w.writeheader()
    w.writerows(attribution)
    atomic_write_text(out / "attribution.csv", buf.getvalue())
    meta = {"name": "gldv2_waterfalls", "world": "paper", "class_word": CLASS_WORD, "size": p["resolution"],
            "data_seed": data_seed, "manifest": str(m.source), "selection": {"rule": m.selection_rule, "params": p},
            "concepts": meta_concepts, "generic_image_ids": [i for i, _ in generic]}
    return writer.finish(meta)
