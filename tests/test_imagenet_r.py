"""ImageNet-R split files (CODA-Prompt's) and their preparation into the classification layout."""
import os
from pathlib import Path

import pytest
import yaml

from continual_bench.data.cls_data import ClsDataset, class_order, task_classes
from continual_bench.data.imagenet_r import label_to_wnid, prepare_imagenet_r, read_split, read_splits
from continual_bench.utils import UserError

REPO = Path(__file__).resolve().parent.parent
# the checkout's sibling shared/ folder, or wherever CONTINUAL_BENCH_IMAGENET_R_SPLITS points
CANDIDATES = [REPO.parent / "shared" / "data" / "imagenet-r-splits",
              *([Path(os.environ["CONTINUAL_BENCH_IMAGENET_R_SPLITS"])] if os.environ.get("CONTINUAL_BENCH_IMAGENET_R_SPLITS") else [])]
SPLITS = next((p for p in CANDIDATES if (p / "imagenet-r_train.yaml").is_file()), None)


@pytest.mark.skipif(SPLITS is None, reason="CODA-Prompt's ImageNet-R split files are not available here")
def test_real_split_files():
    splits = read_splits(SPLITS)  # verifies the pinned sha256, sizes, overlap, labels
    train, test = splits["train"], splits["test"]
    assert (len(train.paths), len(test.paths)) == (24000, 6000)
    assert not set(train.paths) & set(test.paths)
    l2w = label_to_wnid(splits)
    assert sorted(l2w) == list(range(200)) and len(set(l2w.values())) == 200
    assert l2w != dict(enumerate(sorted(l2w.values())))  # the yaml is the label map, not sorted wnids
    assert set(train.targets) == set(test.targets) == set(range(200))


def test_class_order_is_coda_prompts():
    assert class_order(200, 0) == list(range(200))
    assert class_order(200, 1)[:10] == [33, 146, 79, 19, 23, 131, 12, 187, 174, 32]
    order = class_order(200, 2)
    assert sorted(order) == list(range(200)) and order != class_order(200, 1)
    chunks = task_classes(order, 20)
    assert len(chunks) == 20 and all(len(c) == 10 for c in chunks) and chunks[0] == order[:10]
    assert [len(c) for c in task_classes(order, 5)] == [40] * 5
    with pytest.raises(UserError, match="does not divide"):
        task_classes(order, 7)


def _fake(tmp_path, rows_train, rows_test):
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, rows in (("imagenet-r_train.yaml", rows_train), ("imagenet-r_test.yaml", rows_test)):
        doc = {"data": [f"data/imagenet-r/{w}/{f}" for w, f, _ in rows], "targets": [t for _, _, t in rows]}
        (splits / name).write_text(yaml.safe_dump(doc))
    return splits


def test_prepare_links_images_by_label_id(tmp_path):
    from PIL import Image

    rows_train = [("n02", "art_1.jpg", 1), ("n01", "sketch_2.jpg", 0), ("n01", "toy_3.jpg", 0)]
    rows_test = [("n02", "cartoon_4.jpg", 1), ("n01", "art_5.jpg", 0)]
    images = tmp_path / "images" / "imagenet-r"
    for w, f, _ in rows_train + rows_test:
        (images / w).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(images / w / f)
    splits = _fake(tmp_path, rows_train, rows_test)
    out = prepare_imagenet_r(tmp_path / "images", splits, tmp_path / "prepared", verify=False)
    assert (out / "001" / "n02__art_1.jpg").is_symlink()
    ds = ClsDataset(out)
    assert ds.n_classes == 2
    tr = ds.split("train")
    assert len(tr) == 3 and sorted(tr.labels.tolist()) == [0, 0, 1] and len(ds.split("test")) == 2
    with pytest.raises(UserError, match="sha256"):  # verify=True: these are not CODA-P's files
        read_splits(splits)


def test_bad_split_files_are_named(tmp_path):
    splits = _fake(tmp_path, [("n01", "a.jpg", 0), ("n02", "b.jpg", 0)], [("n01", "c.jpg", 0)])
    with pytest.raises(UserError, match="label 0 / wnid n02"):
        read_splits(splits, verify=False)
    (tmp_path / "bad.yaml").write_text("data: [x.jpg]\ntargets: [0]\n")
    with pytest.raises(UserError, match="unexpected image path 'x.jpg'"):
        read_split(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        read_split(tmp_path / "missing.yaml")
    (tmp_path / "o").mkdir()
    splits2 = _fake(tmp_path / "o", [("n01", "a.jpg", 0)], [("n01", "a.jpg", 0)])
    with pytest.raises(UserError, match="in both splits"):
        read_splits(splits2, verify=False)
