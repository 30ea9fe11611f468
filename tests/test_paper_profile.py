"""The paper profile (issue 6): its DAG plans every job, the fetchers and preparation steps work on fake
Celeb-A HQ / GLDv2 / ImageNet-R trees served from 127.0.0.1 and write the toy world's layout, the models
fetcher and the real judge's loader, and one short DAG run on the fakes (toy backbone, tiny steps).

The fakes have the real layouts (CelebAMask-HQ.zip with the CelebA-HQ-to-CelebA mapping, identity_CelebA.txt;
GLDv2's metadata CSVs with image URLs, some dead; the ImageNet-R tar and CODA-Prompt-format split yamls).
They are served as a mirror (``<base_url>/<host>/<path>``, config ``paper.base_url``) with manifests whose
checksums are the fakes' (config ``paper.manifests_dir``); nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from continual_bench.utils import UserError

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper.yaml"
SPLITS_URL = "raw.githubusercontent.com/GT-RIPL/CODA-Prompt/6417d4f68754be68b697c7ca2323ee61e791e1a3/dataloaders/splits"
T2I_METHODS = ["textual_inversion", "dreambooth", "lora_sequential", "custom_diffusion", "custom_diffusion_merge",
               "custom_diffusion_ewc", "generative_replay", "c_lora", "lfs_diffusion", "lfs_diffusion_no_icgen",
               "joint", "lora_per_concept", "lora_merge_consecutive", "lora_merge_orthogonal", "lora_merge_magnitude",
               "cidm"]
CLS_METHODS = ["upper_bound", "ft", "ft_pp", "lwf", "l2p", "l2p_pp", "dualprompt", "coda_p", "c_lora",
               "simplecil", "aper", "ranpac", "inflora"]


def _env() -> dict:
    return dict(os.environ, CONTINUAL_BENCH_NO_TQDM="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")


def snakemake(workdir: Path, *args: str, configfile: Path = PAPER, timeout: int = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and res.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in workdir.rglob("*.log"))
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}\n{logs}")
    return res


def rule_counts(text: str) -> dict[str, int]:
    """``--quiet rules`` prints a table 'rule  count'."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", parts[0]):
            out[parts[0]] = int(parts[1])
    return out


# ---------------------------------------------------------------------------------------------- fakes
def _jpeg(color: tuple[int, int, int], size: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _put(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# identities: CelebA file -> identity; CelebA-HQ holds 4 images of 3 identities, 2 of one, 1 of another
CELEB_HQ = {7: 4, 12: 4, 30: 4, 41: 2, 55: 1}
# GLDv2: landmark_id -> (category name, n images); "Fallsburg" is not the whole word "Falls"
GLD = {1: ("Niagara_Falls", 4), 2: ("Eiffel_Tower", 4), 3: ("Cascada_del_waterfall_x", 4), 4: ("Angel_Falls", 4),
       5: ("Fallsburg", 4), 6: ("Sutherland%20Falls", 4)}
GLD_DEAD = {"3000000000000003"}  # one dead link (landmark 3's first image)
WNIDS = ["n01443537", "n01484850", "n01494475", "n01498041"]


def build_fakes(root: Path) -> dict[str, Path]:
    """Fake raw datasets in their real layouts: a mirror tree (served over HTTP), a manual-download folder,
    and manifests carrying the fakes' checksums. Returns their paths."""
    mirror, manual, manifests = root / "mirror", root / "manual", root / "manifests"
    for d in (mirror, manual / "celeba_hq", manifests):
        d.mkdir(parents=True, exist_ok=True)
    shipped = {n: yaml.safe_load((REPO / "data_manifests" / f"{n}.yaml").read_text())
               for n in ("celeba_hq", "gldv2_waterfalls", "imagenet_r")}

    # --- Celeb-A HQ: CelebAMask-HQ.zip (images + mapping) and identity_CelebA.txt, both by hand
    zbuf, idx, ident_lines, mapping = io.BytesIO(), 0, [], ["idx orig_idx orig_file"]
    with zipfile.ZipFile(zbuf, "w") as zf:
        for identity, n in CELEB_HQ.items():
            for j in range(n):
                orig = f"{identity * 100 + j:06d}.jpg"
                ident_lines.append(f"{orig} {identity}")
                mapping.append(f"{idx} {identity * 100 + j} {orig}")
                zf.writestr(f"CelebAMask-HQ/CelebA-HQ-img/{idx}.jpg", _jpeg((20 * identity % 255, 90, 160), seed=idx))
                idx += 1
        zf.writestr("CelebAMask-HQ/CelebA-HQ-to-CelebA-mapping.txt", "\n".join(mapping) + "\n")
    ident_lines.append("999999.jpg 77")  # CelebA images outside CelebA-HQ are listed too
    identity_txt = ("\n".join(ident_lines) + "\n").encode()
    (manual / "celeba_hq" / "CelebAMask-HQ.zip").write_bytes(zbuf.getvalue())
    (manual / "celeba_hq" / "identity_CelebA.txt").write_bytes(identity_txt)
    m = shipped["celeba_hq"]
    next(f for f in m["files"] if f["path"] == "identity_CelebA.txt")["md5"] = _md5(identity_txt)
    m["selection"]["params"].update(min_images=3, n_concepts=2, resolution=32, n_generic=2)

    # --- GLDv2: metadata CSVs on the S3 host, images on a Wikimedia-like host (some links dead)
    cats, train, attrib = ["landmark_id,category"], ["id,url,landmark_id"], ["id,url,author,license,title"]
    for lid, (name, n) in GLD.items():
        cats.append(f"{lid},http://commons.wikimedia.org/wiki/Category:{name}")
        for j in range(n):
            image_id = f"{lid}{j:015d}"
            url = f"https://upload.wikimedia.org/wikipedia/commons/{image_id[:2]}/{image_id}.jpg"
            train.append(f"{image_id},{url},{lid}")
            attrib.append(f'{image_id},{url},Author {lid},CC-BY-SA-4.0,"File:{name} {j}.jpg"')
            if image_id not in GLD_DEAD:
                _put(mirror, url.split("://", 1)[1], _jpeg((40, 60 + 25 * lid, 200), seed=int(image_id[-3:]) + lid))
    for rel, lines in (("train.csv", train), ("train_label_to_category.csv", cats), ("train_attribution.csv", attrib)):
        _put(mirror, f"s3.amazonaws.com/google-landmark/metadata/{rel}", ("\n".join(lines) + "\n").encode())
    shipped["gldv2_waterfalls"]["selection"]["params"].update(
        min_images=3, max_images=4, n_concepts=2, pool_size=2, min_interval_s=0.0, n_generic=2, generic_per_landmark=1,
        resolution=32)

    # --- ImageNet-R: the tar on the authors' host, CODA-Prompt-format split yamls at the pinned commit
    tbuf = io.BytesIO()
    rows = {"train": [], "test": []}
    labels = [2, 0, 3, 1]  # label ids are not in sorted-wnid order: the yaml is the label map
    with tarfile.open(fileobj=tbuf, mode="w") as tf:
        for wnid, label in zip(WNIDS, labels):
            for j, rendition in enumerate(["art", "cartoon", "sketch", "toy"]):
                fname = f"{rendition}_{j}.jpg"
                data = _jpeg((60 * label, 100, 80), seed=label * 10 + j)
                info = tarfile.TarInfo(f"imagenet-r/{wnid}/{fname}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                rows["test" if j == 3 else "train"].append((f"data/imagenet-r/{wnid}/{fname}", label))
    tar = tbuf.getvalue()
    _put(mirror, "people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", tar)
    m = shipped["imagenet_r"]
    for split, split_rows in rows.items():
        doc = yaml.safe_dump({"data": [p for p, _ in split_rows], "targets": [t for _, t in split_rows]}).encode()
        _put(mirror, f"{SPLITS_URL}/imagenet-r_{split}.yaml", doc)
        f = next(f for f in m["files"] if f["path"] == f"splits/imagenet-r_{split}.yaml")
        f.update(sha256=_sha(doc), size=len(doc))
    next(f for f in m["files"] if f["path"] == "imagenet-r.tar")["md5"] = _md5(tar)
    m["selection"]["params"].update(n_classes=4, n_train=12, n_test=4, n_tasks=[2])

    for name, raw in shipped.items():
        (manifests / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return {"mirror": mirror, "manual": manual, "manifests": manifests}


class _Mirror(ThreadingHTTPServer):
    daemon_threads = True


HUB_LFS = (".safetensors", ".bin", ".pth", ".pt")


class _QuietHandler(SimpleHTTPRequestHandler):
    """The mirror's files; under ``/huggingface.co/<owner>/<name>/resolve/<revision>/<path>`` it answers as the
    Hugging Face Hub does for huggingface_hub's HEAD and GET: a branch is looked up in ``<owner>/<name>/refs/<branch>``
    (a file holding the commit), and the response names the commit (``X-Repo-Commit``) and the file's ``ETag``:
    the sha256 for LFS files (``X-Linked-Etag``, ``X-Linked-Size``; a ``<file>.etag`` beside it overrides it, to
    fake a hub that announces another file), the git blob sha1 for the others."""

    def log_message(self, format, *args):
        pass

    def send_head(self):
        self._hub = {}
        m = re.fullmatch(r"/huggingface\.co/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if m:
            repo, rev, rel = m.groups()
            base = Path(self.directory) / "huggingface.co" / repo
            if not re.fullmatch(r"[0-9a-f]{40}", rev):
                ref = base / "refs" / rev
                if not ref.is_file():
                    self.send_error(404, "Revision Not Found")
                    return None
                rev = ref.read_text().strip()
            f = base / "resolve" / rev / rel
            if f.is_file():
                data = f.read_bytes()
                if rel.endswith(HUB_LFS):
                    override = f.with_name(f.name + ".etag")
                    etag = override.read_text().strip() if override.is_file() else hashlib.sha256(data).hexdigest()
                    self._hub = {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
                else:
                    etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                self._hub.update({"X-Repo-Commit": rev, "ETag": f'"{etag}"'})
            self.path = f"/huggingface.co/{repo}/resolve/{rev}/{rel}"
        return super().send_head()

    def end_headers(self):
        for k, v in getattr(self, "_hub", {}).items():
            self.send_header(k, v)
        super().end_headers()


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on 127.0.0.1 (a mirror: <base_url>/<host>/<path>, Hub paths answered as the Hub
    does); yields the base URL."""
    srv = _Mirror(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    paths = build_fakes(tmp_path_factory.mktemp("fakes"))
    with serve(paths["mirror"]) as base_url:
        yield {**paths, "base_url": base_url}


# ------------------------------------------------------------------------------- layout = the toy world's
def _layout(root: Path) -> dict:
    """What a prepared dataset looks like: manifest columns, and every image in its concept's folder."""
    df = pd.read_csv(root / "manifest.csv", dtype=str)
    folders = {p.split("/")[0] for p in df.path}
    concepts = set(df.concept)
    assert all((root / p).is_file() for p in df.path), "manifest lists missing images"
    assert all(p.split("/")[0] == c for p, c in zip(df.path, df.concept)), "an image outside its concept's folder"
    assert all(p.count("/") == 1 for p in df.path)
    return {"columns": list(df.columns), "folder_per_concept": folders == concepts, "world_json": (root / "world.json").is_file(),
            "splits": set(df.split)}


def test_fetch_and_prepare_fakes_give_the_toy_layout(fakes, tmp_path, tiny_world, caplog):
    from continual_bench.data.celeba_hq import prepare_celeba_hq
    from continual_bench.data.datasets import PreparedDataset
    from continual_bench.data.gldv2 import fetch_waterfall_images, prepare_gldv2_waterfalls, select_waterfalls
    from continual_bench.data.paper import fetch_dataset, prepare_imagenet_r_from_manifest
    from continual_bench.data.toy_imagenet_r import write_toy_imagenet_r

    from continual_bench.data import datasets, paper

    assert paper.MANIFEST_COLUMNS == datasets.MANIFEST_COLUMNS  # a copy: the preparation steps do not import torch
    man, raw, out = fakes["manifests"], tmp_path / "raw", tmp_path / "prepared"
    toy = _layout(tiny_world)

    # Celeb-A HQ: manual files only; a missing manual dir names the files and where they go
    with pytest.raises(UserError, match="manual download required.*CelebAMask-HQ.zip"):
        fetch_dataset(man / "celeba_hq.yaml", raw / "celeba_hq", manual_dir=tmp_path / "nowhere")
    fetch_dataset(man / "celeba_hq.yaml", raw / "celeba_hq", manual_dir=fakes["manual"] / "celeba_hq")
    prepare_celeba_hq(raw / "celeba_hq", out / "celeba_hq", data_seed=0, manifest=man / "celeba_hq.yaml")
    celeb = _layout(out / "celeba_hq")
    assert celeb["columns"] == toy["columns"] and celeb["folder_per_concept"] and celeb["world_json"]
    ds = PreparedDataset(out / "celeba_hq")
    assert ds.concepts() == ["celeb_00007", "celeb_00012", "celeb_00030"]  # >= 3 images: the pool
    assert len(ds.records("generic")) == 2 and ds.images("celeb_00007").shape == (4, 3, 32, 32)
    world = json.loads((out / "celeba_hq" / "world.json").read_text())
    assert world["concepts"]["celeb_00012"]["identity"] == 12 and world["selection"]["params"]["min_images"] == 3

    # GLDv2: metadata, the documented selection, only the selected images, politely and locked
    caplog.set_level("INFO", logger="continual_bench")
    fetch_dataset(man / "gldv2_waterfalls.yaml", raw / "gldv2", base_url=fakes["base_url"])
    candidates = select_waterfalls(raw / "gldv2", raw / "gldv2" / "selection.csv", manifest=man / "gldv2_waterfalls.yaml")
    assert sorted(candidates) == [1, 3, 4, 6]  # waterfall / whole-word Falls; not Eiffel_Tower, not Fallsburg
    stats = fetch_waterfall_images(raw / "gldv2", raw / "gldv2" / "selection.csv", raw / "gldv2" / "fetched.csv",
                                   manifest=man / "gldv2_waterfalls.yaml", base_url=fakes["base_url"], backoff=0.0)
    assert stats["concepts"] == 2 and stats["generic"] == 2
    # a log line per landmark fetched: what came through and how far the pool and the generic images are
    lines = [m for m in caplog.messages if m.startswith("gldv2: landmark ")]
    assert re.fullmatch(r"gldv2: landmark \d+ \(.+\): 4 of 4 images came through; pool 1/2, generic 0/2", lines[0])
    assert lines[-1].endswith("pool 2/2, generic 2/2")
    lock = json.loads((raw / "gldv2" / "images.lock.json").read_text())["sha256"]
    fetched = pd.read_csv(raw / "gldv2" / "fetched.csv", dtype={"id": str})
    assert set(lock) == set(fetched[fetched.status == "ok"].path)
    assert len(lines) == fetched[fetched.role != "short"].landmark_id.nunique() == 4
    assert (fetched[fetched.id.isin(GLD_DEAD)].status.str.contains("404")).all()
    # offline: the same images verify against the lock without a request
    fetch_waterfall_images(raw / "gldv2", raw / "gldv2" / "selection.csv", raw / "gldv2" / "fetched2.csv",
                           manifest=man / "gldv2_waterfalls.yaml", offline=True)
    prepare_gldv2_waterfalls(raw / "gldv2", raw / "gldv2" / "fetched.csv", out / "gldv2_waterfalls",
                             manifest=man / "gldv2_waterfalls.yaml")
    gld = _layout(out / "gldv2_waterfalls")
    assert gld["columns"] == toy["columns"] and gld["folder_per_concept"] and gld["world_json"]
    assert len(PreparedDataset(out / "gldv2_waterfalls").concepts()) == 2
    credits = pd.read_csv(out / "gldv2_waterfalls" / "attribution.csv")
    assert len(credits) == len(pd.read_csv(out / "gldv2_waterfalls" / "manifest.csv")) and credits.author.notna().all()

    # ImageNet-R: the archive (md5) and the split files (sha256) from the mirror; classes as label-id folders
    fetch_dataset(man / "imagenet_r.yaml", raw / "imagenet_r", base_url=fakes["base_url"])
    prepare_imagenet_r_from_manifest(raw / "imagenet_r", out / "imagenet_r", manifest=man / "imagenet_r.yaml")
    toy_cls = tmp_path / "toy_imagenet_r"
    write_toy_imagenet_r(toy_cls, n_classes=2, n_train=1, n_test=1, n_pretrain=2)
    inr, toy_inr = _layout(out / "imagenet_r"), _layout(toy_cls)
    assert inr["columns"] == toy_inr["columns"] and inr["folder_per_concept"] and inr["world_json"]
    assert inr["splits"] == {"train", "test"} <= toy_inr["splits"]
    # offline with nothing fetched: the first missing file is named
    with pytest.raises(UserError, match=r"imagenet-r.tar: missing, and offline is set"):
        fetch_dataset(man / "imagenet_r.yaml", tmp_path / "empty", offline=True)


# --------------------------------------------------------------------------------------- planning (dry runs)
EXPECTED_JOBS = {"fetch_dataset": 3, "fetch_model": 4, "paper_judge": 1, "prepare_celeba_hq": 1,
                 "select_gldv2_waterfalls": 1, "fetch_gldv2_images": 1, "prepare_gldv2_waterfalls": 1,
                 "prepare_imagenet_r": 1, "train": 2 * 16 * 3, "generate": 2 * 16 * 3, "evaluate": 2 * 16 * 3,
                 "train_cls": 13 * 3 * 3, "tables": 1}


def test_config_values_never_run_as_shell_code(fakes, tmp_path):
    """Free-text config values reach the rules' shell commands quoted: a manual_dir holding `$(...)`, `;` and spaces
    is passed to the fetch job as one literal path (and works); a base_url holding `$(...)` is refused by the schema.
    Nothing of either is ever executed."""
    import shutil

    manual = tmp_path / "by hand $(touch PWNED1); touch PWNED2 #"
    shutil.copytree(fakes["manual"] / "celeba_hq", manual / "celeba_hq")
    work = tmp_path / "work"
    cfg = {**yaml.safe_load((REPO / "config" / "ci.yaml").read_text()),
           "paper": {"manual_dir": str(manual), "manifests_dir": str(fakes["manifests"])}}
    (tmp_path / "quoting.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(work, "--cores", "1", "data/raw/celeba_hq/fetched.json", configfile=tmp_path / "quoting.yaml")
    assert "PWNED" not in {p.name[:5] for p in tmp_path.rglob("*")} and not list(work.rglob("PWNED*")), res.stderr[-2000:]
    fetched = json.loads((work / "data/raw/celeba_hq/fetched.json").read_text())
    assert "CelebAMask-HQ.zip" in fetched["files"]  # taken from the literal folder

    cfg["paper"]["base_url"] = f"http://127.0.0.1/$(touch {tmp_path}/PWNED3)"
    (tmp_path / "inject.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(work, "--cores", "1", "-f", "data/raw/imagenet_r/fetched.json", configfile=tmp_path / "inject.yaml",
                    check=False)
    assert res.returncode != 0 and "configuration error: paper.base_url:" in res.stderr
    assert not list(tmp_path.rglob("PWNED*"))


def test_paper_config_names_every_method_and_valid_settings():
    import dataclasses

    from continual_bench.methods.base import build_settings
    from continual_bench.methods.registry import get_method

    cfg = yaml.safe_load(PAPER.read_text())
    assert cfg["methods"] == T2I_METHODS and cfg["cls_methods"] == CLS_METHODS
    assert cfg["seeds"] == [0, 1, 2] and cfg["cls_seeds"] == [0, 1, 2] and cfg["cls_n_tasks"] == [5, 10, 20]
    assert set(cfg["benchmarks"]) == {"celeba_hq", "gldv2_waterfalls"} and cfg["cls_benchmarks"] == ["imagenet_r"]
    checked = 0
    for track, table, extra in (("t2i", "method_settings", cfg["benchmark_settings"]["celeba_hq"]),
                                ("cls", "cls_method_settings", cfg["cls_train"])):
        for name, settings in cfg[table].items():
            try:
                method = get_method(track, name)
            except Exception:  # a method not registered in this checkout: nothing to check against
                continue
            built = build_settings(method.Settings, {**extra, **settings}, f"{table}.{name}")
            assert dataclasses.asdict(built).items() >= {**extra, **settings}.items()
            checked += 1
    assert checked >= 10


# A comment that names where a value comes from: a paper or code that was read, REFERENCE.md, or a project choice.
CLS_SOURCE = re.compile(r"CODA-P|C-LoRA|L2P|DualPrompt|Li & Hoiem|REFERENCE|project|paper_clora_lambda|RevisitingCIL|"
                        r"RanPAC|InfLoRA")


def cls_setting_comments(text: str) -> dict[tuple[str, str], str]:
    """(``cls_train`` or a method name, field) -> the comments that cover the paper.yaml line setting it: the
    comment on its line(s) and the comment lines right above (a ``cls_train`` key, or a whole
    ``cls_method_settings`` entry, which may span lines)."""
    data = yaml.safe_load(text)
    lines = text.splitlines()
    out: dict[tuple[str, str], str] = {}
    for section in ("cls_train", "cls_method_settings"):
        start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{section}:"))
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^[A-Za-z_]", lines[i])), len(lines))
        entry = re.compile(r"^  (\w+):" if section == "cls_method_settings" else r"^\s+(\w+):")
        starts = [i for i in range(start + 1, end) if entry.match(lines[i])]
        for k, i in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else end
            span = [ln for ln in lines[i:stop] if not ln.lstrip().startswith("#")]
            above, j = [], i - 1
            while j > start and lines[j].lstrip().startswith("#"):
                above.append(lines[j])
                j -= 1
            comment = " ".join([ln.split("#", 1)[1] for ln in span if "#" in ln] + above)
            name = entry.match(lines[i]).group(1)
            if section == "cls_train":
                out[("cls_train", name)] = comment
            else:
                for field in (data[section][name] or {}):
                    out[(name, field)] = comment
    return out


def cls_source_problems(text: str) -> list[str]:
    """Every field of every cls method the profile runs must be set in the file itself (cls_method_settings or
    cls_train; not left to its Settings default, which is the toy profile's value, nor to config/config.yaml)
    with a comment naming its source."""
    import dataclasses

    from continual_bench.methods.registry import get_method

    data = yaml.safe_load(text)
    comments = cls_setting_comments(text)
    problems = []
    for name in data["cls_methods"]:
        for f in dataclasses.fields(get_method("cls", name).Settings):
            key = (name, f.name) if f.name in (data["cls_method_settings"].get(name) or {}) else \
                  ("cls_train", f.name) if f.name in (data["cls_train"] or {}) else None
            if key is None:
                problems.append(f"cls/{name}.{f.name}: not set in config/paper.yaml, so ImageNet-R runs the Settings "
                                f"default {f.default!r} (the toy profile's value); set it with a comment naming its source")
            elif not CLS_SOURCE.search(comments.get(key, "")):
                where = f"cls_method_settings.{name}" if key[0] == name else "cls_train"
                problems.append(f"cls/{name}.{f.name}: {where}.{f.name} in config/paper.yaml has no comment naming "
                                f"its source (got {comments.get(key, '')!r})")
    return problems


def test_paper_profile_names_every_cls_setting_with_its_source():
    problems = cls_source_problems(PAPER.read_text())
    assert not problems, "\n".join(problems)


def test_cls_source_check_fails_on_a_toy_default_or_a_missing_source():
    text = PAPER.read_text()
    assert "lam: 1.0e+8, " in text and "  min_steps: 0              # CODA-P" in text
    problems = cls_source_problems(text.replace("lam: 1.0e+8, ", ""))  # C-LoRA back on its toy lambda
    assert problems == ["cls/c_lora.lam: not set in config/paper.yaml, so ImageNet-R runs the Settings default 10000.0 "
                        "(the toy profile's value); set it with a comment naming its source"]
    problems = cls_source_problems(text.replace("  min_steps: 0              # CODA-P counts epochs only", "  min_steps: 0 #"))
    assert len(problems) == len(CLS_METHODS)
    assert all(".min_steps: cls_train.min_steps in config/paper.yaml has no comment" in p for p in problems)


def test_paper_dag_plans_every_job(tmp_path):
    res = snakemake(tmp_path, "-n", "--cores", "8", "--quiet", "rules")
    counts = rule_counts(res.stdout + res.stderr)
    assert {k: counts.get(k) for k in EXPECTED_JOBS} == EXPECTED_JOBS


def test_paper_dag_on_slurm_sets_gpu_resources(tmp_path):
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed: Snakemake needs the executor plugin even "
                    "for a dry run of --profile profiles/slurm (pip install snakemake-executor-plugin-slurm)")
    res = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / "slurm"))
    out = res.stdout + res.stderr
    jobs = re.split(r"\n(?=(?:local)?rule \w+:)", out)
    # every rule that declares gpu=1 (noise_floor too: the base model's samples) gets the GPU partition
    for rule, n in (("train", EXPECTED_JOBS["train"]), ("generate", EXPECTED_JOBS["generate"]),
                    ("train_cls", EXPECTED_JOBS["train_cls"]), ("noise_floor", 2)):
        blocks = [b for b in jobs if re.match(rf"(?:local)?rule {rule}:", b)]
        assert len(blocks) == n, rule
        assert all(re.search(r"resources: .*\bgpu=1\b", b) and "slurm_partition=gpu" in b and "runtime=" in b
                   for b in blocks), blocks[0]
    assert not any(re.search(r"\bgpu=1\b", b) for b in jobs if re.match(r"(?:local)?rule (fetch_\w+|prepare_\w+):", b))


def test_gpu_slots_pin_one_gpu_per_process(monkeypatch, tmp_path):
    from continual_bench import gpu_slots

    monkeypatch.setenv("CONTINUAL_BENCH_GPU_LOCKS", str(tmp_path))
    monkeypatch.setenv("CONTINUAL_BENCH_GPU_SLOTS", "2")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
        assert gpu_slots.acquire_gpu_slot() == "4"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # a second job: slot 0 is held
        assert gpu_slots.acquire_gpu_slot() == "6" and os.environ["CUDA_VISIBLE_DEVICES"] == "6"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
        with pytest.raises(TimeoutError):
            gpu_slots.acquire_gpu_slot(poll=0.01, timeout=0.05)
        monkeypatch.setenv("SLURM_JOB_ID", "1")  # SLURM isolates GPUs itself
        assert gpu_slots.acquire_gpu_slot() is None
    finally:
        while gpu_slots._HELD:
            gpu_slots._HELD.pop().close()


# ------------------------------------------------------------------------------- models and the paper judge
@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory) -> Path:
    """torch-fidelity InceptionV3 weights with random values (the real ones are not downloadable here)."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:  # build the module without loading (or downloading) weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(module.state_dict(), path)
    return path


def _tiny_openai_clip(path: Path) -> Path:
    """A tiny CLIP ViT saved as an OpenAI-style state dict (the format of OpenAI's ViT-B-32.pt, minus JIT)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, quick_gelu=True,
                           vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1})
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def hub_online(monkeypatch):
    """huggingface_hub as online (tests run with HF_HUB_OFFLINE=1), without its best-effort registry request to
    huggingface.co; every request then goes to the 127.0.0.1 endpoint the fetcher is given."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_detect_agent, "_fetch_registry", lambda: None, raising=False)


FAKE_VIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _pin(spec: dict, commit: str) -> None:
    """What a user does before the first paper run: write a commit into revision and the URLs."""
    old = spec["revision"]
    spec["revision"] = commit
    for f in spec["files"]:
        f["url"] = f["url"].replace(f"/resolve/{old}/", f"/resolve/{commit}/")


def test_fetch_models_from_a_mirror_and_build_the_paper_judge(tmp_path, tiny_pipeline, fake_inception, hub_online):
    import torch

    from continual_bench.backbones.t2i import load_pipeline
    from continual_bench.data.model_resources import build_paper_judge, fetch_model
    from continual_bench.evaluation.judge import load_judge

    mirror, res = tmp_path / "mirror", tmp_path / "resources"
    models = yaml.safe_load((REPO / "data_manifests" / "models.yaml").read_text())
    spec = models["models"]
    # Stable Diffusion: a tiny pipeline's files at the pinned revision's URLs
    rev = spec["stable_diffusion"]["revision"]
    hub = f"huggingface.co/CompVis/stable-diffusion-v1-4/resolve/{rev}"
    spec["stable_diffusion"]["files"] = []
    for f in sorted(p for p in tiny_pipeline.rglob("*") if p.is_file()):
        rel = f.relative_to(tiny_pipeline).as_posix()
        _put(mirror, f"{hub}/{rel}", f.read_bytes())
        spec["stable_diffusion"]["files"].append({"path": rel, "url": f"https://{hub}/{rel}", "sha256": None})
    # CLIP: an OpenAI-format checkpoint with its sha256 pinned, as in the real manifest
    clip = spec["clip_vit_b_32"]["files"][0]
    data = _tiny_openai_clip(tmp_path / "clip.pt").read_bytes()
    _put(mirror, clip["url"].split("://", 1)[1], data)
    clip["sha256"] = _sha(data)
    # Inception: the hash prefix is checked, the full hash locked
    inc = spec["inception_kid"]["files"][0]
    data = fake_inception.read_bytes()
    _put(mirror, inc["url"].split("://", 1)[1], data)
    inc["sha256_prefix"] = _sha(data)[:8]
    # ViT-B/16 (timm layout): two small files stand in for it, at a commit the test pins (models.yaml ships `main`)
    _pin(spec["vit_b_16"], FAKE_VIT_COMMIT)
    for f in spec["vit_b_16"]["files"]:
        _put(mirror, f["url"].split("://", 1)[1], b'{"architecture": "vit_base_patch16_224"}' if f["path"] == "config.json"
             else b"not really safetensors")
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump(models, sort_keys=False))

    with serve(mirror) as base_url:
        for name in ("stable_diffusion", "clip_vit_b_32", "inception_kid", "vit_b_16"):
            fetch_model(name, res, base_url=base_url, models_file=models_file, backoff=0.0)
    record = json.loads((res / "stable_diffusion" / "fetched.json").read_text())
    assert record["revision"] == record["commit"] == rev and record["repo_id"] == "CompVis/stable-diffusion-v1-4"
    locked = json.loads((res / "stable_diffusion" / "checksums.lock.json").read_text())["sha256"]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert locked[unet] == record["files"][unet]["sha256"] == record["hub_etag"][unet]  # the hub's LFS sha256
    pipe = load_pipeline(res / "stable_diffusion")  # the fetched folder loads offline as it is
    assert pipe.unet.config.sample_size == 16
    # offline: present files verify against the lock without a server; a missing one is named
    fetch_model("vit_b_16", res, offline=True, models_file=models_file)
    with pytest.raises(UserError, match=r"vit_b_16/config.json: missing, and offline is set"):
        fetch_model("vit_b_16", tmp_path / "elsewhere", offline=True, models_file=models_file)
    # a file whose hash does not start with the published prefix is refused
    inc["sha256_prefix"] = "0000" if not inc["sha256_prefix"].startswith("0000") else "1111"
    models_file.write_text(yaml.safe_dump(models, sort_keys=False))
    with pytest.raises(UserError, match="does not start with the published prefix"):
        fetch_model("inception_kid", res, offline=True, models_file=models_file)

    judge_dir = build_paper_judge(res / "clip_vit_b_32", res / "inception_kid", res / "judge")
    judge = load_judge(judge_dir)
    x = torch.rand(2, 3, 24, 24)
    assert judge.kid_extractor is not None and judge.kid_features(x).shape == (2, 2048)  # KID on Inception
    assert judge.image_features(x).shape == (2, 32) and judge.text_features(["a photo of a person"]).shape == (1, 32)


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def test_hub_models_are_fetched_at_a_pinned_commit(tmp_path, hub_online, monkeypatch, caplog):
    """models.yaml pins vit_b_16 to a commit; set to a branch (`main`), it is refused unless allowed; allowed, `main`
    is resolved once and every later fetch uses that commit; files are checked against the hub's LFS sha256 and the
    checksum lock."""
    from huggingface_hub import constants

    from continual_bench.data.manifests import parse_models
    from continual_bench.data.model_resources import fetch_model

    models = yaml.safe_load((REPO / "data_manifests" / "models.yaml").read_text())
    spec = models["models"]["vit_b_16"]
    assert re.fullmatch(r"[0-9a-f]{40}", spec["revision"]) and spec["repo_id"] == "timm/vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert all(spec["revision"] in f["url"] for f in spec["files"])
    for f in spec["files"]:  # a user who unpins it
        f["url"] = f["url"].replace(spec["revision"], "main")
    spec["revision"] = "main"
    mirror, res = tmp_path / "mirror", tmp_path / "res"
    hub = mirror / "huggingface.co" / spec["repo_id"]
    for commit, weights in ((COMMIT_A, b"weights at A"), (COMMIT_B, b"weights at B")):
        _put(hub, f"resolve/{commit}/config.json", b'{"architecture": "vit_base_patch16_224"}')
        _put(hub, f"resolve/{commit}/model.safetensors", weights)
    _put(hub, "refs/main", COMMIT_A.encode())
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump(models, sort_keys=False))
    weights = res / "vit_b_16" / "model.safetensors"
    with serve(mirror) as base_url:
        fetch = functools.partial(fetch_model, "vit_b_16", res, base_url=base_url, models_file=models_file)
        with pytest.raises(UserError, match=r"models.vit_b_16: revision 'main' of timm/vit_base_patch16_224.augreg_in21k_"
                                            r"ft_in1k is a branch or tag, not a commit.*paper.allow_unpinned_models"):
            fetch()
        assert not weights.exists()
        caplog.set_level("INFO", logger="continual_bench")
        fetch(allow_unpinned=True)  # resolved once: main -> A, locked
        assert weights.read_bytes() == b"weights at A"
        assert any(re.fullmatch(rf"downloaded {re.escape(str(weights))}: 12 bytes, sha256 (ok \(.+\)|locked .+)", m)
                   for m in caplog.messages), caplog.messages  # a log line per file
        assert json.loads((res / "vit_b_16" / "revision.lock.json").read_text())["commit"] == COMMIT_A
        assert json.loads((res / "vit_b_16" / "fetched.json").read_text())["commit"] == COMMIT_A
        (hub / "refs" / "main").write_text(COMMIT_B)  # the branch moves on the hub
        weights.unlink()
        fetch(allow_unpinned=True)  # the locked commit, not the moved branch
        assert weights.read_bytes() == b"weights at A"
        (res / "vit_b_16" / "revision.lock.json").unlink()
        weights.unlink()
        with pytest.raises(UserError, match="model.safetensors: sha256 mismatch with .*checksums.lock.json"):
            fetch(allow_unpinned=True)  # resolving main again gives B's weights: the checksum lock refuses them
        assert not weights.exists()

        # pinned to a commit: no refusal; a file that is not the one the hub announces (LFS sha256) is refused
        _pin(spec, COMMIT_A)
        models_file.write_text(yaml.safe_dump(models, sort_keys=False))
        (hub / "resolve" / COMMIT_A / "model.safetensors.etag").write_text("0" * 64)
        with pytest.raises(UserError, match="does not match the hub's LFS sha256 0000"):
            fetch_model("vit_b_16", tmp_path / "res2", base_url=base_url, models_file=models_file)
        assert not (tmp_path / "res2" / "vit_b_16" / "model.safetensors").exists()
        (hub / "resolve" / COMMIT_A / "model.safetensors.etag").unlink()
        fetch_model("vit_b_16", tmp_path / "res2", base_url=base_url, models_file=models_file)
    # HF_HUB_OFFLINE: no request; present files verify against the lock, a missing one is named
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fetch_model("vit_b_16", tmp_path / "res2", models_file=models_file)
    (tmp_path / "res2" / "vit_b_16" / "config.json").unlink()
    with pytest.raises(UserError, match=r"config.json: missing, and offline is set.*HF_HUB_OFFLINE=1 is set"):
        fetch_model("vit_b_16", tmp_path / "res2", models_file=models_file)
    # models.yaml: a Hub file needs repo_id, and its URL must be <repo_id>/resolve/<revision>/<path>
    raw = yaml.safe_load((REPO / "data_manifests" / "models.yaml").read_text())
    del raw["models"]["vit_b_16"]["repo_id"]
    with pytest.raises(UserError, match="config.json is on the Hugging Face Hub: set 'repo_id'"):
        parse_models(raw, "models.yaml")
    raw = yaml.safe_load((REPO / "data_manifests" / "models.yaml").read_text())
    raw["models"]["vit_b_16"]["revision"] = COMMIT_A
    with pytest.raises(UserError, match=r"config.json: URL .*/resolve/[0-9a-f]{40}/config.json is not .*/resolve/aaaa"):
        parse_models(raw, "models.yaml")


def test_judge_dispatch_and_missing_files(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from continual_bench.evaluation.judge import TOY_JUDGE_CFG, TOY_PREPROCESS, load_judge

    d = tmp_path / "judge"
    with pytest.raises(UserError, match="open_clip_config.json: missing"):
        load_judge(d)
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TOY_JUDGE_CFG, "preprocess_cfg": TOY_PREPROCESS}))
    with pytest.raises(UserError, match="no open_clip_model.safetensors"):
        load_judge(d)
    model = open_clip.CLIP(**TOY_JUDGE_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    assert load_judge(d).kid_extractor is None  # toy judge: KID on its own CLIP features
    (d / "judge.json").write_text(json.dumps({"clip": ".", "kid_features": "inception",
                                              "inception_weights": "weights-inception-2015-12-05-6726825d.pth"}))
    with pytest.raises(UserError, match="weights-inception-2015-12-05-6726825d.pth: Inception weights for KID missing"):
        load_judge(d)
    (d / "judge.json").write_text(json.dumps({"kid_features": "clip"}))
    assert load_judge(d).kid_extractor is None
    (d / "judge.json").write_text(json.dumps({"kid_features": "dino"}))
    with pytest.raises(UserError, match="kid_features must be"):
        load_judge(d)


# ------------------------------------------------------------------------- one short DAG run on the fakes
@pytest.fixture(scope="module")
def fake_dag(tmp_path_factory, fakes, tiny_pipeline) -> Path:
    """The paper profile's DAG on the fake trees: fetch (mirror on 127.0.0.1, manual Celeb-A HQ files) and
    prepare all three datasets, then train / generate / evaluate one run on celeba_hq (one method, one seed,
    2 tasks) and the tables. A toy-sized pipeline and judge stand in for Stable Diffusion and CLIP
    (paper.t2i_backbone, paper.judge); all steps tiny. (The classification runs read ImageNet-R through
    the same prepared layout; their rules are covered by test_cls_dag.py.)"""
    import open_clip
    from safetensors.torch import save_file

    from continual_bench.evaluation.judge import TOY_JUDGE_CFG, TOY_PREPROCESS

    work = tmp_path_factory.mktemp("paper_dag")
    judge = work / "stand-ins" / "judge"
    judge.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TOY_JUDGE_CFG).state_dict().items()},
              str(judge / "open_clip_model.safetensors"))
    (judge / "open_clip_config.json").write_text(json.dumps({"model_cfg": TOY_JUDGE_CFG, "preprocess_cfg": TOY_PREPROCESS}))
    cfg = {
        "run_name": "fakes", "world": "paper", "threads_per_run": 1,
        "benchmarks": ["celeba_hq"], "methods": ["lora_sequential"], "n_tasks": [2], "seeds": [0],
        "evaluation": {"n_samples": 2, "sample_steps": 1, "guidance": 3.0},
        "method_settings": {"lora_sequential": {"steps": 2, "batch_size": 2, "rank": 2}},
        "paper": {"manual_dir": str(fakes["manual"]), "manifests_dir": str(fakes["manifests"]),
                  "base_url": fakes["base_url"], "t2i_backbone": str(tiny_pipeline), "judge": str(judge),
                  "gldv2_waterfalls": {"n_generic": 1}},
    }
    configfile = work / "fakes.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    # `all`, plus the GLDv2 and ImageNet-R datasets (prepared, not trained on: the run stays short)
    snakemake(work, "--cores", "2", "all", "data/paper/gldv2_waterfalls/manifest.csv",
              "data/paper/imagenet_r/manifest.csv", configfile=configfile)
    return work


def test_dag_on_fakes_trains_evaluates_and_tables(fake_dag):
    res = fake_dag / "results" / "fakes"
    summary = pd.read_csv(res / "summary.csv")
    assert {(r.track, r.benchmark, r.method, r.n_seeds) for r in summary.itertuples()} == {
        ("t2i", "celeba_hq", "lora_sequential", 1)}
    metrics = set(summary.metric)
    assert {"A_mmd", "F_mmd", "A_clip", "P_clip_t", "Frel_mmd", "N_train"} <= metrics
    assert not any(m.endswith("oracle") for m in metrics)  # real data has no oracle
    assert (res / "tables" / "celeba_hq_T2.csv").is_file()
    assert (res / "figures" / "samples" / "celeba_hq_T2_lora_sequential_seed0.png").is_file()
    train = json.loads((res / "runs/celeba_hq/T2/lora_sequential/seed0/train.json").read_text())
    assert set(train["sequence"]) <= {"celeb_00007", "celeb_00012", "celeb_00030"} and train["class_word"] == "person"
    for name in ("celeba_hq", "gldv2_waterfalls", "imagenet_r"):
        assert _layout(fake_dag / "data" / "paper" / name)["folder_per_concept"]
    assert (fake_dag / "data/raw/gldv2_waterfalls/images.lock.json").is_file()
    assert "Nothing to be done" in snakemake(fake_dag, "-n", "--cores", "2", configfile=fake_dag / "fakes.yaml").stdout
    # switching to offline re-runs the fetch jobs (they verify what is there), nothing behind them:
    # no preparation, training or evaluation
    res = snakemake(fake_dag, "-n", "--cores", "2", "--quiet", "rules", "--config", "paper={offline: true}",
                    configfile=fake_dag / "fakes.yaml")
    planned = set(rule_counts(res.stdout)) - {"total", "all"}
    assert "fetch_dataset" in planned and planned <= {"fetch_dataset", "run_config"}  # run_config: the config changed


def test_held_out_references_need_min_images_plus_n_eval():
    """n_eval > 0: an identity qualifies only with min_images training images left after holding out n_eval."""
    from continual_bench.data.celeba_hq import select_identities
    from continual_bench.data.paper import split_images

    by_id = {1: list(range(15)), 2: list(range(20)), 3: list(range(25)), 4: list(range(14))}
    assert select_identities(by_id, min_images=15, pool_size=None, data_seed=0) == [1, 2, 3]
    assert select_identities(by_id, min_images=15, pool_size=None, data_seed=0, n_eval=5) == [2, 3]
    with pytest.raises(UserError, match="only 2 identities have at least 20 images"):
        select_identities(by_id, min_images=15, pool_size=3, data_seed=0, n_eval=5)
    splits = [s for _, s in split_images(by_id[2], 5)]
    assert splits.count("train") == 15 and splits[-5:] == ["eval"] * 5
