"""ImageFolder scanning and every layout mistake a user can make, each a DataError naming the fix."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.data import DataError, build_source, prepare_dataset_root
from pipeline.data.folder import scan_dataset, scan_split

LAYOUT = {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}}


def scan(root: str, split: str = "train", num_classes: int = 2):
    return scan_dataset(root, split_dir=split, train_dir="train", val_dir="val", num_classes=num_classes)


def test_class_index_is_sorted_folder_names_and_files_are_sorted(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for name in ("zebra", "ant", "Moose"):
            (root / split / name).mkdir(parents=True)
    train = root / "train"
    for rel in (
        "zebra/b.JPEG",
        "zebra/a.jpg",
        "ant/x.png",
        "ant/sub/y.jpeg",
        "Moose/m.jpg",
        "val_dummy.txt",
        "ant/notes.txt",
        "ant/.hidden.jpg",
    ):
        (train / rel).parent.mkdir(parents=True, exist_ok=True)
        (train / rel).write_bytes(b"not decoded by the scan")
    (train / ".ipynb_checkpoints").mkdir()
    for name in ("zebra", "ant", "Moose"):
        (root / "val" / name / "v.jpg").write_bytes(b"x")

    index = scan(str(root), num_classes=3)
    assert index.classes == ("Moose", "ant", "zebra")  # Python string order, as torchvision's ImageFolder
    rel = [os.path.relpath(f, train) for f in index.files]
    assert rel == ["Moose/m.jpg", "ant/x.png", "ant/sub/y.jpeg", "zebra/a.jpg", "zebra/b.JPEG"]
    assert index.labels == (0, 1, 1, 2, 2)
    assert all(os.path.isabs(f) for f in index.files)


def test_valid_tree_scans_both_splits(tree):
    root, _ = tree(LAYOUT)
    assert len(scan(root, "train")) == 5
    assert len(scan(root, "val")) == 2


def test_root_missing(tmp_path, make_cfg):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match=r"nope does not exist.*--data.root"):
        scan(missing)
    with pytest.raises(DataError, match=r"nope does not exist"):
        prepare_dataset_root(make_cfg(root=missing))


def test_root_empty_string(make_cfg):
    with pytest.raises(DataError, match=r"data.root is empty"):
        prepare_dataset_root(make_cfg(root=""))


@pytest.mark.parametrize("missing, key", [("train", "train_dir"), ("val", "val_dir")])
def test_split_folder_missing(tree, missing, key):
    root, _ = tree({s: c for s, c in LAYOUT.items() if s != missing})
    os.makedirs(os.path.join(root, "other"))
    with pytest.raises(DataError) as e:
        scan(root)
    msg = str(e.value)
    assert f"has no {missing}/ folder" in msg and root in msg
    assert f"--data.{key}" in msg and "other" in msg  # lists what is there


def test_images_directly_in_split(tree):
    root, _ = tree({"val": {"a": 1, "b": 1}})
    flat = os.path.join(root, "train")
    os.makedirs(flat)
    for k in range(3):
        open(os.path.join(flat, f"{k}.jpg"), "wb").close()
    with pytest.raises(DataError) as e:
        scan(root)
    msg = str(e.value)
    assert f"{flat} is not an ImageFolder layout: expected {flat}/<class>/<image>" in msg
    assert "3 images directly in it" in msg


def test_split_folder_empty(tree):
    root, _ = tree({"val": {"a": 1, "b": 1}})
    os.makedirs(os.path.join(root, "train"))
    with pytest.raises(DataError, match=r"train is empty: expected an ImageFolder layout"):
        scan(root)


def test_other_split_flat_is_reported_too(tree):
    root, _ = tree({"train": {"a": 1, "b": 1}})
    os.makedirs(os.path.join(root, "val"))
    open(os.path.join(root, "val", "x.png"), "wb").close()
    with pytest.raises(DataError, match=r"val is not an ImageFolder layout"):
        scan(root, "train")


def test_class_folder_without_images(tree):
    root, _ = tree(LAYOUT)
    empty = os.path.join(root, "train", "emu")
    os.makedirs(empty)
    open(os.path.join(empty, "readme.txt"), "w").close()
    os.makedirs(os.path.join(root, "val", "emu"))
    with pytest.raises(DataError) as e:
        scan(root, num_classes=3)
    assert "contain no images" in str(e.value) and empty in str(e.value)


def test_whole_split_without_images(tree):
    root, _ = tree({"val": {"a": 1, "b": 1}})
    for name in ("a", "b"):
        os.makedirs(os.path.join(root, "train", name))
    with pytest.raises(DataError, match=r"has 2 class folders but no images"):
        scan(root)


def test_train_and_val_class_sets_differ(tree):
    root, _ = tree({"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "emu": 1}})
    for split in ("train", "val"):
        with pytest.raises(DataError) as e:
            scan(root, split)
        msg = str(e.value)
        assert "class folders differ" in msg and "only in train: dog" in msg and "only in val: emu" in msg


def test_class_count_differs_from_model(tree):
    root, _ = tree({"train": {str(c): 1 for c in range(7)}, "val": {str(c): 1 for c in range(7)}})
    with pytest.raises(DataError) as e:
        scan(root, num_classes=10)
    assert str(e.value) == (f"dataset at {root} has 7 classes but model.num_classes = 10; set --model.num_classes=7")


def test_build_source_validates_before_building_a_pipeline(tree, make_cfg):
    root, _ = tree(LAYOUT)
    cfg = make_cfg(root=root)
    for split in ("train", "val"):
        with pytest.raises(DataError, match="model.num_classes = 5"):
            build_source(cfg, split=split, rank=0, world_size=1, device=torch.device("cpu"), seed=0, num_classes=5)


def test_scan_split_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_split(str(tmp_path / "x"))
