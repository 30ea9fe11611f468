"""The toy world's oracle: a classifier that says which concept a generated image shows.

The toy world knows the truth about its concepts, so a classifier trained on the concepts' real images
plus the generic class (images of other identities) is a sharper instrument than any feature distance:
``P_oracle`` (share of samples of concept k recognised as k right after learning it), ``A_oracle``
(the same after the last task) and ``F_oracle`` (their drop), and takeover (samples of an old concept
recognised as the newest one).

The network is a 4-layer CNN written here: no library ships a model this small for 32x32 inputs, and a
ResNet from timm would cost 10x the training time for no gain on flat cartoon images.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from ..data.datasets import PreparedDataset, load_images
from ..utils import UserError, atomic_path, atomic_write_json, seed_everything, stable_seed

log = logging.getLogger(__name__)
GENERIC = "generic"


class OracleNet(nn.Module):
    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        )
        self.head = nn.Linear(2 * w, n_classes)

    def forward(self, x):  # x in [0, 1]
        return self.head(self.features(x * 2 - 1))


class Oracle:
    """``classes[i]`` names output i (``generic`` or a concept name)."""

    def __init__(self, net: OracleNet, classes: list[str], image_size: int):
        self.net = net.eval()
        self.classes = classes
        self.image_size = image_size

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[str]:
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        idx = torch.cat([self.net(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
        return [self.classes[i] for i in idx.tolist()]

    def save(self, out_dir: str | Path, stats: dict) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / "model.safetensors") as tmp:
            save_file(self.net.state_dict(), str(tmp))
        atomic_write_json(out_dir / "oracle.json", {"classes": self.classes, "image_size": self.image_size, **stats})

    @classmethod
    def load(cls, path: str | Path) -> "Oracle":
        path = Path(path)
        meta_file = path / "oracle.json"
        if not meta_file.is_file():
            raise UserError(f"{meta_file}: missing; train the oracle first")
        meta = json.loads(meta_file.read_text())
        net = OracleNet(len(meta["classes"]))
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        return cls(net, meta["classes"], meta["image_size"])


def _named_attributes(world: str) -> list[str]:
    from ..data.toy import WORLDS

    return [a.name for a in WORLDS[world].attributes]


def _same_attribute_images(data_dir: Path, concept_attrs: dict, n: int, seed: int) -> torch.Tensor:
    """``n`` images of other identities drawn by the toy world with the concept's named attributes.

    Fine details (face shape, eye spacing, glasses, ...) are drawn at random, so a class trained on
    these and on the concept's own images is the class of its *named attributes*. Without them, a
    concept whose attribute combination no generic person happened to share was learned by its face:
    the oracle then rejected the base model's samples of the concept's full caption (5 of 20 concepts
    at 0 %, although every named attribute was rendered right).
    """
    from ..data.toy import WORLDS

    meta = json.loads((data_dir / "world.json").read_text())
    spec = WORLDS[meta["name"]]
    imgs = []
    for i in range(n):
        rng = np.random.default_rng(stable_seed("oracle-same-attributes", meta["name"], seed, i,
                                                json.dumps(concept_attrs, sort_keys=True)))
        ident = {**spec.new_identity(rng, spec), **concept_attrs}
        imgs.append(torch.from_numpy(np.asarray(spec.draw(ident, rng))).permute(2, 0, 1))
    return torch.stack(imgs).float() / 255.0


def train_oracle(data_dir, out_dir, *, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
                 n_generic: int = 400, n_same_attributes: int = 48, seed: int = 0) -> dict:
    """Train on every concept's images (train + eval split) and ``n_generic`` generic images.

    The oracle decides *whose named attributes* an image shows (concepts differ from each other in at
    least two), so images of other people with a concept's attributes (generic ones with the same
    caption, and ``n_same_attributes`` more drawn by the toy world) are labelled as that concept; their
    fine details vary and the oracle learns to ignore them. Training images are blurred at random, like the samples of a small diffusion model.
    A quarter of each class is held out to report the oracle's own accuracy (``val_acc``), then the
    final model is the one trained on the rest: the oracle must be trustworthy, so its accuracy is
    recorded next to it and in the run's provenance.
    """
    seed_everything(seed)
    data_dir = Path(data_dir)
    ds = PreparedDataset(data_dir)
    world = json.loads((data_dir / "world.json").read_text()) if (data_dir / "world.json").is_file() else None
    classes = [GENERIC] + ds.concepts()
    xs, ys = [], []
    rng = np.random.default_rng(stable_seed("oracle", seed))
    caption_of = {r.concept: r.caption for r in ds.records() if r.concept != GENERIC}
    generic = ds.records(concept=GENERIC)
    for ci, c in enumerate(classes):
        if c == GENERIC:
            recs = [r for r in generic if r.caption not in caption_of.values()]
            recs = [recs[i] for i in rng.permutation(len(recs))[:n_generic]]
        else:
            recs = ds.records(concept=c) + [r for r in generic if r.caption == caption_of[c]]

        x_c = load_images([r.path for r in recs])
        if c != GENERIC and world is not None and n_same_attributes:
            named = {k: world["concepts"][c][k] for k in _named_attributes(world["name"])}
            x_c = torch.cat([x_c, _same_attribute_images(data_dir, named, n_same_attributes, seed)])
        xs.append(x_c)
        ys.append(torch.full((len(x_c),), ci))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.from_numpy(rng.permutation(len(x)))
    n_val = len(x) // 4
    val, tr = perm[:n_val], perm[n_val:]
    net = OracleNet(len(classes))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(stable_seed("oracle-batches", seed))
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="train oracle", mininterval=5):
        net.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = x[idx]
            # augment like the generations vary: flips, small shifts, brightness
            xb = torch.where((torch.rand(len(xb), generator=g) < 0.5).view(-1, 1, 1, 1), xb.flip(-1), xb)
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            xb = (xb * (0.85 + 0.3 * torch.rand(len(xb), 1, 1, 1, generator=g))).clamp(0, 1)
            sigma = float(torch.rand(1, generator=g)) * 1.2
            if sigma > 0.3:
                xb = gaussian_blur(xb, kernel_size=5, sigma=sigma)
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        val_acc = float((net(x[val]).argmax(1) == y[val]).float().mean())
    stats = {"val_acc": round(val_acc, 4), "n_classes": len(classes), "n_images": len(x), "epochs": epochs,
             "seconds": round(time.time() - t0, 1)}
    Oracle(net, classes, x.shape[-1]).save(out_dir, stats)
    log.info("oracle %s: %s", data_dir, stats)
    return stats
