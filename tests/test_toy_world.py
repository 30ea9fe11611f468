import csv
import itertools
import json

import numpy as np
import pytest

from continual_bench.data.datasets import PreparedDataset, load_image
from continual_bench.data.toy import WORLDS, sample_concepts, write_world
from continual_bench.utils import UserError


def test_layout_and_manifest(tiny_world):
    rows = list(csv.DictReader(open(tiny_world / "manifest.csv")))
    assert set(rows[0]) == {"path", "concept", "split", "caption"}
    ds = PreparedDataset(tiny_world)
    assert ds.concepts() == [f"concept_{k:02d}" for k in range(4)]
    for c in ds.concepts():
        assert (tiny_world / c).is_dir()
        assert len(ds.records(c, "train")) == 6 and len(ds.records(c, "eval")) == 4
    x = ds.images("concept_00", "train")
    assert x.shape == (6, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    # images of one concept vary (pose, scale, background, lighting)
    assert (x[0] - x[1]).abs().mean() > 0.02
    # captions name the class word and attributes; concepts keep the caption of their identity
    assert all(r["caption"].startswith("a photo of a person") for r in rows)


def test_deterministic_by_seed(tmp_path):
    a = write_world("toy_landmarks", tmp_path / "a", seed=3, n_concepts=2, n_train=2, n_eval=2, n_generic=4, n_generic_ids=2)
    b = write_world("toy_landmarks", tmp_path / "b", seed=3, n_concepts=2, n_train=2, n_eval=2, n_generic=4, n_generic_ids=2)
    c = write_world("toy_landmarks", tmp_path / "c", seed=4, n_concepts=2, n_train=2, n_eval=2, n_generic=4, n_generic_ids=2)
    for rel in ("manifest.csv", "world.json", "concept_00/train_000.png", "generic/000001.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "concept_00/train_000.png").read_bytes() != (c / "concept_00/train_000.png").read_bytes()


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_concepts_are_fine_grained_and_held_out(name, tmp_path):
    spec = WORLDS[name]
    concepts = sample_concepts(spec, 20, seed=0)  # a pool for 20-task sequences
    dist = {(i, j): sum(a[x.name] != b[x.name] for x in spec.attributes)
            for (i, a), (j, b) in itertools.combinations(enumerate(concepts), 2)}
    assert min(dist.values()) >= 2  # distinguishable
    assert all(d <= 3 for (i, j), d in dist.items() if j < 9)  # the first ones share attributes: they interfere
    assert np.mean([d <= 3 for d in dist.values()]) > 0.5
    root = write_world(name, tmp_path / name, n_concepts=3, n_train=1, n_eval=1, n_generic=50, n_generic_ids=50)
    meta = json.loads((root / "world.json").read_text())
    generic = [json.dumps(i, sort_keys=True) for i in meta.get("generic_identities", [])]
    assert len(generic) == 50
    for ident in meta["concepts"].values():
        assert json.dumps(ident, sort_keys=True) not in generic  # held-out identities


def test_corrupt_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="bad.png: corrupt"):
        load_image(bad)
    with pytest.raises(UserError, match="manifest.csv: missing"):
        PreparedDataset(tmp_path)
