"""``toy_imagenet_r``: a procedurally generated stand-in for ImageNet-R (classification track).

ImageNet-R renders 200 ImageNet classes as art, cartoons, sketches, embroidery, ... and is learned
class-incrementally on top of a ViT that saw those classes as *photos*. This world copies that structure
at 32x32 RGB, deterministically from a seed:

* a **class** is a geometric composition: one of ``SHAPES`` (outline geometry) x one of ``MARKS`` (an inner
  mark: none, a dot, a bar, two dots), e.g. "a star with a bar". 10 shapes x 4 marks = 40 classes, enough
  for 5/10/20 tasks with >= 2 classes each. Every shape and mark is mirror-symmetric, so horizontal flips
  (the toy profile's augmentation) never change a class. Classes that share a shape or a mark are
  fine-grained neighbours, so learning one interferes with the others (ImageNet-R's dog breeds);
* **colour never identifies a class**: every image draws its colours at random (within the rendition's
  palette), as ImageNet photos of a class come in any colour. Identity is geometry only;
* a **rendition** is a drawing style (``RENDITIONS``). ``photo`` (shaded fill, textured background,
  lighting) is the backbone's pretraining rendition; the continual-learning data uses the others:
  ``sketch`` (pencil outlines on paper, no fill), ``cartoon`` (flat saturated fill, thick black outline),
  ``painting`` (brush strokes, blur, warm canvas), ``pixel`` (8-12 px blocky, few colours), ``embroidery``
  (stitched hatching on fabric). They keep the geometry and change everything else, as ImageNet-R does;
* per-image nuisances: position, scale, a small rotation, lighting, noise.

Why these sizes (measured, toy ViT of :mod:`continual_bench.backbones.vit`, 1,400 pretraining steps): with
marks of 2-3 px, object radii of 26-38 % of the image and 2-5 clutter blobs per photo, the backbone reached
27 % on held-out photos; with the larger marks, objects and less clutter used now, 78 % with 100 photos
per class and 90 % with 200 (nearest-class-mean accuracy of its frozen features on the other renditions:
42 % and 55 %; a ViT-B/16 prototype classifier on ImageNet-R is in the mid 50s to low 60s, so the toy
sits in the same regime).

Layout written by :func:`write_toy_imagenet_r` (the prepared-dataset layout of
:mod:`continual_bench.data.datasets`; :mod:`continual_bench.data.imagenet_r` writes the real dataset the
same way, so one classification code path reads both)::

    <out>/manifest.csv          path,concept,split,caption    concept = label id "000".."039"
    <out>/world.json            classes (shape, mark), renditions, counts, seed
    <out>/000/pretrain_0000.png photo rendition: the backbone's pretraining split ("pretrain")
    <out>/000/train_sketch_000.png, test_cartoon_002.png, ...   the continual-learning splits
"""
from __future__ import annotations

import colorsys
import io
import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..utils import UserError, atomic_write_text, stable_seed

SIZE = 32
SCALE = 3  # drawing resolution multiplier (96 px canvas, anti-aliased down to 32)
S = SIZE * SCALE

PRETRAIN_RENDITION = "photo"
RENDITIONS = ("photo", "sketch", "cartoon", "painting", "pixel", "embroidery")
CL_RENDITIONS = tuple(r for r in RENDITIONS if r != PRETRAIN_RENDITION)
MARKS = ("plain", "dot", "bar", "two dots")


# ------------------------------------------------------------------------------------------------ shapes
def _regular(n: int, start: float = -math.pi / 2, r: float = 1.0) -> list[tuple[float, float]]:
    return [(r * math.cos(start + 2 * math.pi * i / n), r * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart() -> list[tuple[float, float]]:
    pts = []
    for i in range(40):
        t = 2 * math.pi * i / 40
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17, (y + 2) / 17))
    return pts


# unit-square polygons centred on (0, 0), every one symmetric under x -> -x
SHAPES: dict[str, list[tuple[float, float]]] = {
    "circle": _regular(36),
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0, -1.0), (0.95, 0.8), (-0.95, 0.8)],
    "diamond": [(0, -1.0), (0.7, 0), (0, 1.0), (-0.7, 0)],
    "star": _star(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "hexagon": _regular(6, start=0.0),
    "house": [(0, -1.0), (0.9, -0.2), (0.7, -0.2), (0.7, 0.9), (-0.7, 0.9), (-0.7, -0.2), (-0.9, -0.2)],
    "hourglass": [(-0.8, -0.95), (0.8, -0.95), (0.15, 0), (0.8, 0.95), (-0.8, 0.95), (-0.15, 0)],
    "heart": _heart(),
}


def class_list(n_classes: int) -> list[dict]:
    """The first ``n_classes`` (shape, mark) compositions; label id = position. Marks vary fastest within
    a block of shapes so that any prefix of the list mixes shapes and marks."""
    shapes = list(SHAPES)
    total = len(shapes) * len(MARKS)
    if not 1 <= n_classes <= total:
        raise UserError(f"toy_imagenet_r: n_classes must be 1..{total}, got {n_classes}")
    out = []
    for i in range(total):
        mark = MARKS[i % len(MARKS)]
        shape = shapes[(i // len(MARKS) + 3 * (i % len(MARKS))) % len(shapes)]
        phrase = {"plain": "no mark", "two dots": "two dots"}.get(mark, f"a {mark}")
        out.append({"shape": shape, "mark": mark, "name": f"{shape} with {phrase}"})
    # the interleaving above is a permutation of all (shape, mark) pairs
    assert len({(c["shape"], c["mark"]) for c in out}) == total
    return out[:n_classes]


# ------------------------------------------------------------------------------------------------ geometry
def _pose(rng: np.random.Generator) -> dict:
    return {"cx": S / 2 + rng.uniform(-0.12, 0.12) * S, "cy": S / 2 + rng.uniform(-0.12, 0.12) * S,
            "r": rng.uniform(0.3, 0.4) * S, "rot": rng.uniform(-0.25, 0.25), "aspect": rng.uniform(0.9, 1.1)}


def _place(pts, pose, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0):
    c, s = math.cos(pose["rot"]), math.sin(pose["rot"])
    out = []
    for x, y in pts:
        x, y = (x * scale + dx) * pose["r"] * pose["aspect"], (y * scale + dy) * pose["r"]
        out.append((pose["cx"] + c * x - s * y, pose["cy"] + s * x + c * y))
    return out


def _mark_parts(mark: str) -> list[list[tuple[float, float]]]:
    """The inner mark as polygons in the shape's unit frame (kept inside every shape's core)."""
    if mark == "plain":
        return []
    if mark == "dot":
        return [[(x * 0.36, y * 0.36 + 0.1) for x, y in _regular(16)]]
    if mark == "bar":
        return [[(-0.5, -0.08), (0.5, -0.08), (0.5, 0.28), (-0.5, 0.28)]]
    if mark == "two dots":
        return [[(x * 0.22 + sx, y * 0.22 + 0.1) for x, y in _regular(12)] for sx in (-0.3, 0.3)]
    raise ValueError(mark)


# ------------------------------------------------------------------------------------------------ colours
def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return int(r * 255), int(g * 255), int(b * 255)


def _contrast(rgb, rng) -> tuple[int, int, int]:
    """A colour clearly different in lightness from ``rgb`` (marks must stay visible)."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    v = rng.uniform(0.05, 0.3) if lum > 120 else rng.uniform(0.8, 1.0)
    return _hsv(rng.uniform(), rng.uniform(0, 0.8), v)


def _noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _down(img: Image.Image) -> Image.Image:
    return img.resize((SIZE, SIZE), Image.LANCZOS)


# ------------------------------------------------------------------------------------------------ renditions
def _photo(cls: dict, rng: np.random.Generator) -> Image.Image:
    """Shaded object of a random colour on a cluttered, lit background."""
    bg = _hsv(rng.uniform(), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.9))
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):  # clutter
        x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(4, 16) * SCALE
        d.ellipse([x - r, y - r, x + r, y + r], fill=_hsv(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.3, 0.9)))
    img = img.filter(ImageFilter.GaussianBlur(3 * SCALE))
    d = ImageDraw.Draw(img)
    pose = _pose(rng)
    fill = _hsv(rng.uniform(), rng.uniform(0.3, 0.95), rng.uniform(0.35, 0.95))
    shadow = _place(SHAPES[cls["shape"]], dict(pose, cx=pose["cx"] + 2 * SCALE, cy=pose["cy"] + 2 * SCALE))
    d.polygon(shadow, fill=tuple(int(c * 0.45) for c in bg))
    d.polygon(_place(SHAPES[cls["shape"]], pose), fill=fill)
    if rng.random() < 0.5:
        d.line(_place(SHAPES[cls["shape"]], pose) + _place(SHAPES[cls["shape"]], pose)[:1],
               fill=tuple(int(c * 0.6) for c in fill), width=SCALE)
    mark = _contrast(fill, rng)
    for part in _mark_parts(cls["mark"]):
        d.polygon(_place(part, pose), fill=mark)
    # lighting: a soft directional gradient over everything
    arr = np.asarray(img).astype(np.float32)
    g = np.linspace(-1, 1, S)
    a = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0.1, 0.3) * (np.cos(a) * g[None, :] + np.sin(a) * g[:, None])
    arr = arr * light[..., None] * rng.uniform(0.85, 1.1)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5 * SCALE))
    return _noise(_down(img), rng, 4.0)


def _jitter_line(d, pts, rng, fill, width, amount):
    pts = [(x + rng.normal(0, amount), y + rng.normal(0, amount)) for x, y in pts]
    d.line(pts + pts[:1], fill=fill, width=width, joint="curve")


def _sketch(cls: dict, rng: np.random.Generator) -> Image.Image:
    """Pencil outlines (two or three jittered strokes) on paper; no fill, grey only."""
    paper = int(rng.uniform(215, 255))
    img = Image.new("RGB", (S, S), (paper, paper, int(paper * rng.uniform(0.92, 1.0))))
    d = ImageDraw.Draw(img)
    pose = _pose(rng)
    ink = int(rng.uniform(10, 90))
    for _ in range(rng.integers(2, 4)):
        _jitter_line(d, _place(SHAPES[cls["shape"]], pose), rng, (ink, ink, ink), max(1, int(rng.uniform(1, 2.5) * SCALE / 1.5)), 0.8 * SCALE)
        for part in _mark_parts(cls["mark"]):
            _jitter_line(d, _place(part, pose), rng, (ink, ink, ink), SCALE, 0.4 * SCALE)
    if rng.random() < 0.5:  # a few hatching strokes inside
        poly = _place(SHAPES[cls["shape"]], pose)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        for _ in range(rng.integers(2, 6)):
            x = rng.uniform(min(xs), max(xs))
            y = rng.uniform(min(ys), max(ys))
            d.line([(x, y), (x + 5 * SCALE, y - 5 * SCALE)], fill=(ink + 60,) * 3, width=1)
    return _noise(_down(img), rng, 3.0)


def _cartoon(cls: dict, rng: np.random.Generator) -> Image.Image:
    """Flat saturated fill, thick black outline, plain pastel background."""
    img = Image.new("RGB", (S, S), _hsv(rng.uniform(), rng.uniform(0.1, 0.35), rng.uniform(0.85, 1.0)))
    d = ImageDraw.Draw(img)
    pose = _pose(rng)
    poly = _place(SHAPES[cls["shape"]], pose)
    fill = _hsv(rng.uniform(), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    d.polygon(poly, fill=fill)
    d.line(poly + poly[:1], fill=(0, 0, 0), width=int(2.2 * SCALE), joint="curve")
    mark = (0, 0, 0) if rng.random() < 0.6 else (255, 255, 255)
    for part in _mark_parts(cls["mark"]):
        q = _place(part, pose)
        d.polygon(q, fill=mark)
        d.line(q + q[:1], fill=(0, 0, 0), width=SCALE)
    # highlight blob
    hx, hy = pose["cx"] - pose["r"] * 0.4, pose["cy"] - pose["r"] * 0.55
    d.ellipse([hx - 2 * SCALE, hy - 1.2 * SCALE, hx + 2 * SCALE, hy + 1.2 * SCALE], fill=(255, 255, 255))
    return _noise(_down(img), rng, 1.5)


def _painting(cls: dict, rng: np.random.Generator) -> Image.Image:
    """Brush strokes over a blurred fill on a warm canvas."""
    canvas = _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.15, 0.45), rng.uniform(0.55, 0.9))
    img = Image.new("RGB", (S, S), canvas)
    d = ImageDraw.Draw(img)
    for _ in range(25):  # background strokes
        x, y, a = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0, math.pi)
        L = rng.uniform(6, 16) * SCALE
        d.line([(x, y), (x + L * math.cos(a), y + L * math.sin(a))],
               fill=tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in canvas), width=int(2 * SCALE))
    pose = _pose(rng)
    hue = rng.uniform()
    fill = _hsv(hue, rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.8))
    poly = _place(SHAPES[cls["shape"]], pose)
    d.polygon(poly, fill=fill)
    mark = _contrast(fill, rng)
    for part in _mark_parts(cls["mark"]):
        d.polygon(_place(part, pose), fill=mark)
    img = img.filter(ImageFilter.GaussianBlur(1.2 * SCALE))
    d = ImageDraw.Draw(img)
    arr = np.asarray(img)
    for _ in range(40):  # short strokes that pick up the colour underneath
        x, y = int(rng.uniform(0, S - 1)), int(rng.uniform(0, S - 1))
        a, L = rng.uniform(0, math.pi), rng.uniform(2, 5) * SCALE
        col = tuple(int(np.clip(c + rng.normal(0, 18), 0, 255)) for c in arr[y, x])
        d.line([(x, y), (x + L * math.cos(a), y + L * math.sin(a))], fill=col, width=SCALE)
    return _noise(_down(img), rng, 3.0)


def _pixel(cls: dict, rng: np.random.Generator) -> Image.Image:
    """Pixel art: drawn sharp, reduced to 8-12 px and a few colours, scaled back up without smoothing."""
    bg = _hsv(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.9))
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    pose = _pose(rng)
    pose["r"] *= 1.1
    fill = _hsv(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    d.polygon(_place(SHAPES[cls["shape"]], pose), fill=fill)
    mark = _contrast(fill, rng)
    for part in _mark_parts(cls["mark"]):
        d.polygon(_place([(x * 1.25, y * 1.25) for x, y in part], pose), fill=mark)
    n = int(rng.integers(10, 15))
    small = img.resize((n, n), Image.BOX).quantize(colors=int(rng.integers(3, 6))).convert("RGB")
    return small.resize((SIZE, SIZE), Image.NEAREST)


def _embroidery(cls: dict, rng: np.random.Generator) -> Image.Image:
    """Stitched hatching (short parallel threads) and a dashed outline on woven fabric."""
    fabric = _hsv(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.85))
    img = Image.new("RGB", (S, S), fabric)
    d = ImageDraw.Draw(img)
    weave = tuple(int(c * 0.85) for c in fabric)
    for k in range(0, S, 2 * SCALE):  # fabric weave
        d.line([(k, 0), (k, S)], fill=weave, width=1)
        d.line([(0, k), (S, k)], fill=weave, width=1)
    pose = _pose(rng)
    thread = _hsv(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(_place(SHAPES[cls["shape"]], pose), fill=255)
    for part in _mark_parts(cls["mark"]):
        ImageDraw.Draw(mask).polygon(_place(part, pose), fill=0)
    stitches = Image.new("RGB", (S, S), thread)
    sd = ImageDraw.Draw(stitches)
    a = rng.choice([math.pi / 4, 3 * math.pi / 4])
    dark = tuple(int(c * 0.55) for c in thread)
    for k in range(-S, 2 * S, int(1.5 * SCALE)):  # parallel threads with gaps
        x0, y0 = k, 0
        sd.line([(x0, y0), (x0 + S * math.cos(a) * 2, y0 + S * math.sin(a) * 2)], fill=dark, width=1)
    img.paste(stitches, (0, 0), mask)
    poly = _place(SHAPES[cls["shape"]], pose)
    outline = _contrast(thread, rng)
    for i in range(len(poly)):  # dashed outline stitches
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % len(poly)]
        L = math.hypot(x1 - x0, y1 - y0)
        steps = max(1, int(L / (2 * SCALE)))
        for j in range(0, steps, 2):
            t0, t1 = j / steps, min(1.0, (j + 1) / steps)
            d.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                   fill=outline, width=SCALE)
    return _noise(_down(img), rng, 2.0)


DRAW = {"photo": _photo, "sketch": _sketch, "cartoon": _cartoon, "painting": _painting, "pixel": _pixel,
        "embroidery": _embroidery}
assert tuple(DRAW) == RENDITIONS


def draw(cls: dict, rendition: str, rng: np.random.Generator) -> Image.Image:
    """One 32x32 RGB image of class ``cls`` ({"shape", "mark"}) in ``rendition``."""
    return DRAW[rendition](cls, rng)


# ------------------------------------------------------------------------------------------------ writer
def write_toy_imagenet_r(out: str | Path, *, seed: int = 0, n_classes: int = 40, n_train: int = 12, n_test: int = 3,
                         n_pretrain: int = 200, renditions: tuple[str, ...] | list[str] = CL_RENDITIONS) -> Path:
    """Generate the world into ``out`` (deterministic in ``seed``); returns ``out``.

    Per class: ``n_pretrain`` photo images (split ``pretrain``) and, for each continual-learning
    rendition, ``n_train`` + ``n_test`` images (splits ``train`` / ``test``).
    """
    renditions = tuple(renditions)
    bad = [r for r in renditions if r not in DRAW or r == PRETRAIN_RENDITION]
    if bad or not renditions:
        raise UserError(f"toy_imagenet_r: renditions must be a non-empty subset of {list(CL_RENDITIONS)}, got {list(renditions)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = class_list(n_classes)
    rows = []
    for label, cls in enumerate(classes):
        cdir = f"{label:03d}"
        (out / cdir).mkdir(exist_ok=True)
        jobs = [("pretrain", PRETRAIN_RENDITION, i, f"pretrain_{i:04d}") for i in range(n_pretrain)]
        for r in renditions:
            jobs += [(split, r, i, f"{split}_{r}_{i:03d}") for split, n in (("train", n_train), ("test", n_test))
                     for i in range(n)]
        for split, rendition, i, stem in jobs:
            rng = np.random.default_rng(stable_seed("toy_imagenet_r", seed, label, split, rendition, i))
            rel = f"{cdir}/{stem}.png"
            draw(cls, rendition, rng).save(out / rel, compress_level=1)
            rows.append({"path": rel, "concept": cdir, "split": split,
                         "caption": f"a {rendition} of a {cls['name']}"})
    meta = {"name": "toy_imagenet_r", "mirrors": "imagenet_r", "seed": seed, "size": SIZE, "n_classes": n_classes,
            "classes": {f"{k:03d}": c for k, c in enumerate(classes)}, "renditions": list(renditions),
            "pretrain_rendition": PRETRAIN_RENDITION, "n_train": n_train, "n_test": n_test, "n_pretrain": n_pretrain}
    atomic_write_text(out / "world.json", json.dumps(meta, indent=1, sort_keys=True))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "concept", "split", "caption"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())  # written last: its presence means "complete"
    return out
