"""The toy world: procedurally generated stand-ins for the papers' datasets.

Why it looks like this (REFERENCE.md section 5): a first prototype drew faces whose identities differed
in colours the base model never bound to text, and customization barely learned them. Here every
identity is a combination of a few *named*, visually large attributes (hair colour, hair length, skin,
shirt colour) plus fixed fine details (face width and height, eye spacing, mouth width, glasses), and the base
pretraining captions name the attributes ("a photo of a person with blonde hair, tan skin and a red
shirt"), so the pretrained model renders each attribute from words. (Glasses were a named attribute
first; at 32x32 they are a few pixels that the tiny model renders faintly, which made the oracle's
verdicts hinge on them, so they became a fine detail.) A concept is a held-out identity:
its attribute combination occurs in the base data (on other people), its fine details do not, so
learning its token means learning *which* known attributes go together (and its face), the toy analogue
of teaching Stable Diffusion a new face. Concepts share half of their attributes with each other, so
learning one interferes with the others, which is the phenomenon the suite measures. (A first version
held the concepts' attribute combinations out of the base data: the 4M-parameter base model composed
unseen combinations too poorly for customization to reach them within the CPU budget.)

Images are drawn at 4x resolution with PIL and downsampled to 32x32 (anti-aliased): 32x32 is the
largest size at which the whole default DAG trains on two CPU cores within its budget.

Layout written by :func:`write_world` (the same one real datasets get after preparation)::

    <out>/manifest.csv            path,concept,split,caption   (path relative to <out>)
    <out>/world.json              the world's parameters (attributes of every concept, seeds)
    <out>/generic/000123.png      base pretraining images of the generic class
    <out>/concept_00/train_000.png, eval_000.png, ...
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..utils import UserError, atomic_write_text, stable_seed

SIZE = 32
SCALE = 4  # drawing resolution multiplier


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class WorldSpec:
    """A toy world: its generic class word, its named attributes, how to caption and draw an identity."""

    name: str
    class_word: str
    attributes: tuple[Attribute, ...]
    draw: Callable[[dict, np.random.Generator], Image.Image] = field(repr=False)
    new_identity: Callable[[np.random.Generator, "WorldSpec"], dict] = field(repr=False)
    phrases: Callable[[dict], list[str]] = field(repr=False)  # the caption's attribute phrases
    mirrors: str = ""

    def caption(self, identity: dict, rng: np.random.Generator | None = None, keep: float = 1.0) -> str:
        """Caption naming the identity's attributes; with ``rng`` each phrase is kept with prob ``keep``."""
        phrases = [p for p in self.phrases(identity) if rng is None or rng.random() <= keep]
        base = f"a photo of a {self.class_word}"
        if not phrases:
            return base
        if len(phrases) == 1:
            return f"{base} with {phrases[0]}"
        return f"{base} with {', '.join(phrases[:-1])} and {phrases[-1]}"


# ----------------------------------------------------------------------------------------------- colours
PALETTES = {
    "skin": {"pale": (245, 215, 190), "tan": (200, 145, 95), "dark": (95, 60, 40)},
    "hair": {"black": (25, 20, 20), "blonde": (240, 210, 90), "red": (200, 60, 25), "white": (235, 235, 240),
             "blue": (40, 90, 220)},
    "shirt": {"red": (210, 35, 35), "green": (35, 160, 60), "blue": (35, 70, 200), "yellow": (235, 200, 30),
              "purple": (130, 50, 170)},
    "rock": {"grey": (120, 120, 125), "brown": (120, 80, 45), "red": (170, 70, 50), "black": (40, 38, 40)},
    "trees": {"green": (40, 140, 50), "orange": (220, 120, 30), "snowy": (235, 240, 250)},
    "sky": {"blue": (110, 170, 240), "sunset": (245, 140, 80), "night": (25, 30, 70), "grey": (160, 165, 170)},
}
BACKGROUNDS = [(200, 200, 200), (170, 190, 210), (210, 200, 170), (185, 195, 180), (220, 210, 220)]


def _jitter(rgb, rng, amount=12):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)


def _finish(img: Image.Image, rng: np.random.Generator, light: float) -> Image.Image:
    """Per-image lighting (brightness and a soft gradient), downsampling and sensor noise."""
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6 * SCALE / 2))
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32)
    gx = np.linspace(-1, 1, SIZE)[None, :, None] * rng.normal(0, 0.08)
    gy = np.linspace(-1, 1, SIZE)[:, None, None] * rng.normal(0, 0.08)
    arr = arr * (light + gx + gy) + rng.normal(0, 3.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- faces
FACE_ATTRS = (
    Attribute("hair_colour", tuple(PALETTES["hair"])),
    Attribute("hair_length", ("short", "long")),
    Attribute("skin", tuple(PALETTES["skin"])),
    Attribute("shirt", tuple(PALETTES["shirt"])),
)


def _face_phrases(ident: dict) -> list[str]:
    return [f"{ident['hair_length']} {ident['hair_colour']} hair", f"{ident['skin']} skin", f"a {ident['shirt']} shirt"]


def draw_face(identity: dict, rng: np.random.Generator) -> Image.Image:
    S = SIZE * SCALE
    img = Image.new("RGB", (S, S), _jitter(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], rng, 20))
    d = ImageDraw.Draw(img)
    # pose and scale vary per image; face geometry and hair style are part of the identity
    scale = rng.uniform(0.9, 1.08) * S / 128
    cx = S / 2 + rng.uniform(-7, 7) * scale
    cy = S / 2 + rng.uniform(-4, 4) * scale
    turn = rng.uniform(-4, 4) * scale  # horizontal offset of the features: head turned left/right
    fw = identity["face_width"] * scale
    fh = identity["face_height"] * scale
    skin = _jitter(PALETTES["skin"][identity["skin"]], rng, 6)
    hair = _jitter(PALETTES["hair"][identity["hair_colour"]], rng, 8)
    shirt = _jitter(PALETTES["shirt"][identity["shirt"]], rng, 8)
    # shirt / shoulders
    d.ellipse([cx - 58 * scale, cy + fh * 0.75, cx + 58 * scale, cy + fh * 0.75 + 90 * scale], fill=shirt)
    # long hair behind the head
    if identity["hair_length"] == "long":
        d.rectangle([cx - fw - 8 * scale, cy - fh * 0.6, cx + fw + 8 * scale, cy + fh * 1.05], fill=hair)
        d.ellipse([cx - fw - 8 * scale, cy - fh - 8 * scale, cx + fw + 8 * scale, cy + fh * 0.4], fill=hair)
    # neck and face
    d.rectangle([cx - fw * 0.35, cy + fh * 0.5, cx + fw * 0.35, cy + fh * 0.95], fill=skin)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    # short hair: a cap on the top of the head
    if identity["hair_length"] == "short":
        d.chord([cx - fw - 3 * scale, cy - fh - 6 * scale, cx + fw + 3 * scale, cy + fh * 0.2], 180, 360, fill=hair)
    elif identity["hair_length"] == "long":
        d.chord([cx - fw - 2 * scale, cy - fh - 6 * scale, cx + fw + 2 * scale, cy + fh * 0.1], 180, 360, fill=hair)
    # eyes
    ex = identity["eye_spacing"] * scale
    ey = cy - fh * 0.12
    er = 4.5 * scale
    for sx in (-1, 1):
        x = cx + turn + sx * ex
        d.ellipse([x - er * 1.4, ey - er, x + er * 1.4, ey + er], fill=(250, 250, 250))
        d.ellipse([x - er * 0.7, ey - er * 0.7, x + er * 0.7, ey + er * 0.7], fill=(30, 30, 40))
    if identity["glasses"]:
        for sx in (-1, 1):
            x = cx + turn + sx * ex
            d.ellipse([x - er * 2.4, ey - er * 2.0, x + er * 2.4, ey + er * 2.0], outline=(20, 20, 20),
                      width=max(2, int(3 * scale)))
        d.line([cx + turn - ex + er * 2.4, ey, cx + turn + ex - er * 2.4, ey], fill=(20, 20, 20),
               width=max(2, int(3 * scale)))
    # mouth
    my = cy + fh * 0.45
    mw = identity["mouth_width"] * scale
    d.line([cx + turn - mw, my, cx + turn + mw, my], fill=(150, 40, 50), width=max(2, int(4 * scale)))
    light = rng.uniform(0.88, 1.1)
    return _finish(img, rng, light)


def _face_identity(rng: np.random.Generator, spec: WorldSpec) -> dict:
    ident = {a.name: a.values[rng.integers(len(a.values))] for a in spec.attributes}
    ident.update(glasses=bool(rng.integers(2)), face_width=float(rng.uniform(30, 40)), face_height=float(rng.uniform(36, 46)),
                 eye_spacing=float(rng.uniform(11, 17)), mouth_width=float(rng.uniform(6, 14)))
    return ident


# ----------------------------------------------------------------------------------------------- waterfalls
LANDMARK_ATTRS = (
    Attribute("falls", ("one", "two", "three")),
    Attribute("rock", tuple(PALETTES["rock"])),
    Attribute("trees", tuple(PALETTES["trees"])),
    Attribute("sky", tuple(PALETTES["sky"])),
)


def draw_waterfall(identity: dict, rng: np.random.Generator) -> Image.Image:
    S = SIZE * SCALE
    sky = _jitter(PALETTES["sky"][identity["sky"]], rng, 10)
    img = Image.new("RGB", (S, S), sky)
    d = ImageDraw.Draw(img)
    scale = rng.uniform(0.9, 1.1) * S / 128
    shift = rng.uniform(-12, 12) * scale
    horizon = S * (0.22 + identity["cliff_height"] + rng.uniform(-0.04, 0.04))
    # clouds
    for _ in range(rng.integers(0, 3)):
        x, y = rng.uniform(0, S), rng.uniform(0, horizon * 0.8)
        d.ellipse([x - 14 * scale, y - 5 * scale, x + 14 * scale, y + 5 * scale], fill=_jitter((235, 235, 240), rng, 8))
    rock = _jitter(PALETTES["rock"][identity["rock"]], rng, 8)
    d.polygon([(0, horizon + 6 * scale), (S * 0.3, horizon - 4 * scale), (S * 0.7, horizon + 2 * scale),
               (S, horizon - 6 * scale), (S, S), (0, S)], fill=rock)
    # trees on top of the cliff
    tree = _jitter(PALETTES["trees"][identity["trees"]], rng, 10)
    for k in range(identity["n_trees"]):
        x = (k + 0.5) * S / identity["n_trees"] + rng.uniform(-4, 4) * scale
        h = rng.uniform(10, 18) * scale
        d.polygon([(x - 7 * scale, horizon + 2 * scale), (x + 7 * scale, horizon + 2 * scale), (x, horizon - h)],
                  fill=tree)
    # the falls
    n = {"one": 1, "two": 2, "three": 3}[identity["falls"]]
    w = identity["fall_width"] * scale
    gap = S * 0.62 / n
    water = _jitter((225, 240, 250), rng, 6)
    pool_y = S * 0.82
    for k in range(n):
        x = S / 2 + shift + (k - (n - 1) / 2) * gap
        d.rectangle([x - w / 2, horizon, x + w / 2, pool_y], fill=water)
        d.line([x - w / 4, horizon, x - w / 4, pool_y], fill=(190, 215, 235), width=max(1, int(2 * scale)))
    # pool and mist
    d.ellipse([S * 0.08 + shift, pool_y - 8 * scale, S * 0.92 + shift, S + 14 * scale], fill=_jitter((70, 130, 190), rng, 10))
    light = rng.uniform(0.88, 1.1)
    return _finish(img, rng, light)


def _waterfall_identity(rng: np.random.Generator, spec: WorldSpec) -> dict:
    ident = {a.name: a.values[rng.integers(len(a.values))] for a in spec.attributes}
    ident.update(cliff_height=float(rng.uniform(0.0, 0.12)), n_trees=int(rng.integers(3, 7)),
                 fall_width=float(rng.uniform(9, 22)))
    return ident


def _waterfall_phrases(ident: dict) -> list[str]:
    return [f"{ident['falls']} falls", f"{ident['rock']} rocks", f"{ident['trees']} trees", f"a {ident['sky']} sky"]


WORLDS = {
    "toy_faces": WorldSpec("toy_faces", "person", FACE_ATTRS, draw_face, _face_identity, _face_phrases,
                           mirrors="celeba_hq"),
    "toy_landmarks": WorldSpec("toy_landmarks", "waterfall", LANDMARK_ATTRS, draw_waterfall, _waterfall_identity,
                               _waterfall_phrases, mirrors="gldv2_waterfalls"),
}


def _distance(spec: WorldSpec, a: dict, b: dict) -> int:
    return sum(a[x.name] != b[x.name] for x in spec.attributes)


def sample_concepts(spec: WorldSpec, n: int, seed: int, min_diff: int = 2, max_diff: int = 3) -> list[dict]:
    """Held-out identities: pairwise different in at least ``min_diff`` named attributes.

    ``min_diff`` keeps them distinguishable. A greedy draw keeps them fine-grained too (pairwise different
    in at most ``max_diff``, so they share attributes and interfere) for as long as such identities
    exist; a pool larger than that (20 faces allow 20-task sequences) continues without the upper bound.
    """
    n_attrs = len(spec.attributes)
    rng = np.random.default_rng(stable_seed("concepts", spec.name, seed))
    out: list[dict] = []
    for bound in range(max_diff, n_attrs + 1):
        for _try in range(2000):
            cand = spec.new_identity(rng, spec)
            if all(min_diff <= _distance(spec, cand, c) <= bound for c in out):
                out.append(cand)
                if len(out) == n:
                    return out
    raise UserError(f"{spec.name}: cannot sample {n} concepts that differ in at least {min_diff} attributes")


def write_world(name: str, out: str | Path, *, seed: int = 0, n_concepts: int = 10, n_train: int = 16,
                n_eval: int = 32, n_generic: int = 2000, n_generic_ids: int = 500) -> Path:
    """Generate the toy dataset ``name`` into ``out`` (deterministic in ``seed``)."""
    if name not in WORLDS:
        raise ValueError(f"unknown toy world {name!r}; known: {sorted(WORLDS)}")
    spec = WORLDS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    concepts = sample_concepts(spec, n_concepts, seed)
    rows = []
    # generic class: many random identities (other people: they may share a concept's named attributes,
    # never its fine details, which are drawn from continuous ranges)
    rng = np.random.default_rng(stable_seed("generic", name, seed))
    ids = [spec.new_identity(rng, spec) for _ in range(n_generic_ids)]
    (out / "generic").mkdir(exist_ok=True)
    for i in range(n_generic):
        ident = ids[i % len(ids)]
        img_rng = np.random.default_rng(stable_seed("generic-img", name, seed, i))
        img = spec.draw(ident, img_rng)
        rel = f"generic/{i:06d}.png"
        img.save(out / rel)
        rows.append({"path": rel, "concept": "generic", "split": "train", "caption": spec.caption(ident)})
    for k, ident in enumerate(concepts):
        cname = f"concept_{k:02d}"
        (out / cname).mkdir(exist_ok=True)
        for split, n in (("train", n_train), ("eval", n_eval)):
            for i in range(n):
                img_rng = np.random.default_rng(stable_seed("concept-img", name, seed, k, split, i))
                rel = f"{cname}/{split}_{i:03d}.png"
                spec.draw(ident, img_rng).save(out / rel)
                rows.append({"path": rel, "concept": cname, "split": split, "caption": spec.caption(ident)})
    meta = {"name": name, "mirrors": spec.mirrors, "class_word": spec.class_word, "seed": seed, "size": SIZE,
            "concepts": {f"concept_{k:02d}": c for k, c in enumerate(concepts)}, "generic_identities": ids,
            "n_generic": n_generic, "n_generic_ids": n_generic_ids, "n_train": n_train, "n_eval": n_eval}
    atomic_write_text(out / "world.json", json.dumps(meta, indent=1, sort_keys=True))
    _write_manifest(out / "manifest.csv", rows)
    return out


def _write_manifest(path: Path, rows: list[dict]) -> None:
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "concept", "split", "caption"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
