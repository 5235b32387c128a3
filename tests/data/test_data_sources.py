"""The synthetic source, the digits dataset builder, and build_source's dispatch."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import DataError, DataSource, build_source, prepare_dataset_root
from pipeline.data import digits as digits_module

CPU = torch.device("cpu")


# -- synthetic -----------------------------------------------------------------------------------


def synthetic(seed=0, rank=0, world_size=1, **kw):
    cfg = DataConfig(source="synthetic", batch_size=4, image_size=16, synthetic_batches=5, **kw)
    return build_source(cfg, split="train", rank=rank, world_size=world_size, device=CPU, seed=seed, num_classes=7)


def test_synthetic_batches():
    src = synthetic(world_size=2)
    assert isinstance(src, DataSource)
    assert len(src) == 5 and src.num_samples == 5 * 4 * 2 and src.num_classes == 7
    batches = list(src)
    assert len(batches) == 5
    for x, y in batches:
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.device == CPU
        assert y.shape == (4,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 7
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3  # normalised-looking
    assert len(list(src)) == 5 and src.epoch == 2


def test_synthetic_is_deterministic_under_seed():
    a, b, c, d = synthetic(seed=1), synthetic(seed=1), synthetic(seed=2), synthetic(seed=1, rank=1, world_size=2)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, next(iter(c))[0])
    assert not torch.equal(xa, next(iter(d))[0])  # ranks differ


def test_synthetic_resume():
    src = synthetic()
    it = iter(src)
    next(it), next(it)
    state = src.state_dict()
    resumed = synthetic()
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 3 and resumed.epoch == 1
    with pytest.raises(DataError, match="not a 'synthetic' state"):
        resumed.load_state_dict({"format": 1, "kind": "dali"})


def test_synthetic_position_and_start_epoch():
    src = synthetic()
    it = iter(src)
    for _ in range(4):
        next(it)
    assert src.position == (0, 4)
    next(it)
    assert src.position == (1, 0) and src.epoch == 1
    src.start_epoch(3)
    assert src.position == (3, 0) and next(it, None) is None, "a jump ends the live generator"
    assert len(list(src)) == 5 and src.position == (4, 0)


def test_synthetic_needs_no_dataset(tmp_path):
    cfg = DataConfig(source="synthetic", root=str(tmp_path / "missing"))
    assert prepare_dataset_root(cfg) == ""


# -- digits --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    root = prepare_dataset_root(DataConfig(source="digits", cache_dir=cache))
    return cache, root


def count_images(root):
    counts = {}
    for split in ("train", "val"):
        for c in sorted(os.listdir(os.path.join(root, split))):
            counts[(split, c)] = len(os.listdir(os.path.join(root, split, c)))
    return counts


def test_digits_tree(digits_cache):
    cache, root = digits_cache
    assert root == os.path.join(os.path.abspath(cache), "digits")
    counts = count_images(root)
    assert sorted({c for _, c in counts}) == [str(c) for c in range(10)]
    assert sum(counts.values()) == 1797
    train = sum(n for (s, _), n in counts.items() if s == "train")
    assert 0.78 < train / 1797 < 0.82
    for c in range(10):  # stratified: every class split ~80/20
        n_val, n_train = counts[("val", str(c))], counts[("train", str(c))]
        assert 0.17 < n_val / (n_val + n_train) < 0.23
    names = sorted(os.listdir(os.path.join(root, "val", "3")))
    assert all(len(n) == len("0000.jpg") and n.endswith(".jpg") for n in names)
    from PIL import Image

    with Image.open(os.path.join(root, "val", "3", names[0])) as im:
        assert im.size == (32, 32) and im.mode == "RGB" and im.format == "JPEG"
    assert not [n for n in os.listdir(cache) if n.startswith(".digits-")]  # no temp folders left


def test_digits_is_idempotent(digits_cache, monkeypatch):
    cache, root = digits_cache
    before = {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in (".complete", "train/0")}

    def fail(*a, **k):
        raise AssertionError("rebuilt an existing tree")

    monkeypatch.setattr(digits_module, "_write_tree", fail)
    assert prepare_dataset_root(DataConfig(source="digits", cache_dir=cache)) == root
    assert {p: os.stat(os.path.join(root, p)).st_mtime_ns for p in before} == before


def test_digits_split_is_deterministic():
    labels = [i % 10 for i in range(1797)]
    assert digits_module.stratified_split(labels) == digits_module.stratified_split(labels)


def test_digits_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real = digits_module._write_tree

    def counted(out):
        calls.append(out)
        return real(out)

    monkeypatch.setattr(digits_module, "_write_tree", counted)
    results, errors = [], []

    def worker():
        try:
            results.append(digits_module.prepare_digits(str(tmp_path)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    assert sum(count_images(results[0]).values()) == 1797


def test_digits_lost_race_keeps_the_winner(tmp_path, monkeypatch):
    # Another node (shared filesystem, so no common lock) completes the tree while we build ours.
    root = os.path.join(tmp_path, "digits")
    real = digits_module._write_tree

    def racing(out):
        counts = real(out)
        os.makedirs(root)
        with open(os.path.join(root, ".complete"), "w") as f:
            json.dump({"version": digits_module._VERSION}, f)
        return counts

    monkeypatch.setattr(digits_module, "_write_tree", racing)
    assert digits_module.prepare_digits(str(tmp_path)) == root
    assert os.listdir(root) == [".complete"]  # the winner's tree was left alone
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".digits-")]


def test_digits_leaves_a_tree_it_did_not_make_alone(tmp_path):
    root = os.path.join(tmp_path, "digits")
    os.makedirs(os.path.join(root, "train", "0"))  # e.g. an interrupted manual copy, no marker
    with pytest.raises(
        DataError,
        match=r"digits exists but was not made by this pipeline.*move it away.*"
        r"--data.cache_dir",
    ):
        digits_module.prepare_digits(str(tmp_path))
    assert os.path.isdir(os.path.join(root, "train", "0"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".digits-")]


def test_digits_replaces_an_older_version(tmp_path):
    root = os.path.join(tmp_path, "digits")
    os.makedirs(os.path.join(root, "train", "0"))
    with open(os.path.join(root, ".complete"), "w") as f:
        json.dump({"version": digits_module._VERSION - 1}, f)  # ours, but stale
    assert digits_module.prepare_digits(str(tmp_path)) == root
    assert sum(count_images(root).values()) == 1797


def test_digits_unwritable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="--data.cache_dir"):
        digits_module.prepare_digits(str(blocker / "cache"))


def test_digits_sources_end_to_end(digits_cache):
    cache, root = digits_cache
    cfg = DataConfig(source="digits", cache_dir=cache, batch_size=128, num_threads=1, decoder="cpu")
    train = build_source(cfg, split="train", rank=0, world_size=2, device=CPU, seed=0, num_classes=10)
    val = build_source(cfg, split="val", rank=1, world_size=2, device=CPU, seed=0, num_classes=10, root=root)
    assert train.num_samples + val.num_samples == 1797
    assert len(train) == (train.num_samples // 2) // 128
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32) and set(y.tolist()) <= set(range(10))
    assert sum(len(y) for _, y in val) == val.num_samples - val.num_samples // 2
    with pytest.raises(DataError, match="set --model.num_classes=10"):
        build_source(cfg, split="val", rank=0, world_size=1, device=CPU, seed=0, num_classes=100, root=root)


# -- Figure 7's measurement set ------------------------------------------------------------------


@pytest.mark.parametrize("in_memory", [False, True], ids=["dali", "in_memory"])
def test_measurement_batch_holds_every_class_of_the_validation_set(tree, make_cfg, in_memory):
    """The validation split in file order is grouped by class (its first batch is one class): Figure 7's images
    are the first files of every class, as many of each, the same at every call and for any rank count."""
    from datatree import ids

    from pipeline.data import measurement_batch

    classes = {f"c{k}": 12 for k in range(5)}
    root, index = tree({"train": {c: 2 for c in classes}, "val": classes})
    cfg = make_cfg(style="cifar", in_memory=in_memory, val_batch_size=4)
    x, y = measurement_batch(cfg, device=CPU, num_classes=5, root=root, images=20)
    assert sorted(y.tolist()) == [c for c in range(5) for _ in range(4)]  # every class, 4 each
    val = sorted(i for p, i in index.items() if f"{os.sep}val{os.sep}" in p)
    assert sorted(ids(x)) == sorted(v for c in range(5) for v in val[12 * c : 12 * c + 4])  # first files of each
    again, _ = measurement_batch(cfg, device=CPU, num_classes=5, root=root, images=20)
    assert torch.equal(x, again)
    first = next(
        iter(build_source(cfg, split="val", rank=0, world_size=1, device=CPU, seed=0, num_classes=5, root=root))
    )
    assert first[1].unique().tolist() == [0]  # what Figure 7 measured before: one class
    # Fewer images than classes: still one of every class; a class with fewer files gives what it has.
    _, y1 = measurement_batch(cfg, device=CPU, num_classes=5, root=root, images=3)
    _, y2 = measurement_batch(cfg, device=CPU, num_classes=5, root=root, images=500)
    assert y1.tolist() == [0, 1, 2, 3, 4] and y2.bincount().tolist() == [12] * 5


def test_measurement_batch_from_shards_streams_until_every_class_is_there(tmp_path, make_cfg):
    from pipeline.data import measurement_batch
    from pipeline.tools.prepare import main as prepare_main

    root, _ = write_tree_for_shards(tmp_path)
    assert prepare_main(["shards", root, str(tmp_path / "sh"), "--no-progress"]) == 0
    cfg = make_cfg(style="cifar", root=str(tmp_path / "sh"), format="shards", val_batch_size=4)
    x, y = measurement_batch(cfg, device=CPU, num_classes=3, root=str(tmp_path / "sh"), images=6)
    assert y.bincount().tolist() == [2, 2, 2] and x.shape == (6, 3, 16, 16)


def write_tree_for_shards(tmp_path):
    from datatree import write_tree

    root = str(tmp_path / "tree")
    return root, write_tree(root, {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 5, "b": 5, "c": 5}})
