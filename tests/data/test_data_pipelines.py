"""DALI sources on the CPU: augmentation, normalisation, sharding, shuffling and exact resume.

Several ranks are simulated in one process by building one source per rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datatree import MEAN, STD, ids, pixel_values, record_reader, roundtrip, take

from pipeline.data import DataError, DataSource, build_source, resolve_decoder
from pipeline.data.source import shard_sizes

CPU = torch.device("cpu")


def source(cfg, root, split="train", rank=0, world_size=1, seed=0, num_classes=2):
    return build_source(
        cfg, split=split, rank=rank, world_size=world_size, device=CPU, seed=seed, num_classes=num_classes, root=root
    )


def two_class_tree(tree, n_train=24, n_val=10, **kw):
    return tree(
        {"train": {"a": n_train // 2, "b": n_train - n_train // 2}, "val": {"a": n_val // 2, "b": n_val - n_val // 2}},
        **kw,
    )


def label_of(index, root):
    """Expected label per encoded id (class 'a' = 0, 'b' = 1)."""
    return {i: int("/b/" in path) for path, i in index.items()}


# -- augmentation and normalisation --------------------------------------------------------------


def test_cifar_train_batches(tree, make_cfg):
    root, index = two_class_tree(tree)
    src = source(make_cfg(style="cifar"), root)
    assert isinstance(src, DataSource)
    assert len(src) == 6 and src.num_samples == 24 and src.num_classes == 2
    labels = label_of(index, root)
    pad_value = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)
    pad_rows = set()
    for x, y in src:
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.device == CPU
        assert y.shape == (4,) and y.dtype == torch.int64 and y.device == CPU
        assert [labels[i] for i in ids(x)] == y.tolist()
        for img in x:
            is_pad = torch.isclose(img, pad_value.view(3, 1, 1)).all(dim=0)  # (H, W)
            rows = int(is_pad.all(dim=1).sum())
            cols = int(is_pad.all(dim=0).sum())
            assert rows <= 4 and cols <= 4  # 4-pixel zero padding, then a 16x16 crop
            assert is_pad.sum() == rows * 16 + cols * 16 - rows * cols  # only whole pad rows/columns
            pad_rows.add(rows)
    assert len(pad_rows) > 2  # the crop position is random


def test_cifar_val_is_exact_normalisation_in_file_order(tree, make_cfg):
    root, index = two_class_tree(tree)
    src = source(make_cfg(style="cifar"), root, split="val")
    got_ids, got_labels = [], []
    for x, y in src:
        values = pixel_values(x)
        assert torch.allclose(values[:, 0], values[:, 0, :1, :1].expand_as(values[:, 0]), atol=1e-3)  # no crop/pad
        got_ids += ids(x)
        got_labels += y.tolist()
    val_ids = sorted(i for p, i in index.items() if "/val/" in p)
    assert got_ids == val_ids
    assert got_labels == [0] * 5 + [1] * 5
    assert len(src) == 3  # 10 images in batches of 4: 4, 4, 2


def test_random_flip(tree, make_cfg):
    root, _ = two_class_tree(tree, pattern="halves")
    for style in ("cifar", "imagenet"):
        src = source(make_cfg(style=style), root)
        bright_right = []
        for x, _ in src:
            blue = pixel_values(x)[:, 2, 8, :]  # a middle row
            bright_right += (blue[:, -1] > blue[:, 0]).tolist()
        assert any(bright_right) and not all(bright_right), style


def test_imagenet_train_and_val(tree, make_cfg):
    root, index = two_class_tree(tree, size=(24, 20))
    cfg = make_cfg(style="imagenet", image_size=16, val_resize=18)
    labels = label_of(index, root)
    for split, n_batches in (("train", 6), ("val", 3)):
        src = source(cfg, root, split=split)
        assert len(src) == n_batches
        seen = 0
        for x, y in src:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
            # a solid image stays that colour through resizing and cropping
            assert [labels[i] for i in ids(x)] == y.tolist()
            red = pixel_values(x)[:, 0]
            assert torch.allclose(red, red[:, 8:9, 8:9].expand_as(red), atol=1.0)
            seen += len(y)
        assert seen == (24 if split == "train" else 10)


def test_imagenet_val_resizes_shorter_side_then_centre_crops(tree, make_cfg):
    # One image whose red channel is the column index: after resizing 20 -> 18 wide (shorter side)
    # and a 16-wide centre crop, the columns cover the middle of the original gradient.
    import numpy as np
    from PIL import Image

    root, _ = tree({"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}}, size=(30, 20))
    path = f"{root}/val/a/000.png"
    pixels = np.zeros((30, 20, 3), np.uint8)
    pixels[..., 0] = (np.arange(20) * 10)[None, :]
    Image.fromarray(pixels).save(path)
    cfg = make_cfg(style="imagenet", image_size=16, val_resize=18, batch_size=2)
    ((x, _),) = list(source(cfg, root, split="val"))
    red = pixel_values(x)[0, 0]
    assert x.shape == (2, 3, 16, 16)
    row = red[8]
    assert torch.all(row[1:] > row[:-1])  # still a left-to-right gradient, not flipped
    # 18/20 scale: output column j of the crop comes from source x = (j + 1 + 0.5) / 0.9 - 0.5
    expected = torch.tensor([((j + 1 + 0.5) / 0.9 - 0.5) * 10 for j in range(16)])
    assert torch.allclose(row, expected, atol=6.0)


# -- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_shards_read_every_image_exactly_once_per_epoch(tree, make_cfg, world_size):
    root, index = two_class_tree(tree, n_train=23)  # 23 = not divisible by 2 or 3
    cfg = make_cfg(batch_size=3)
    ranks = [source(cfg, root, rank=r, world_size=world_size, seed=5) for r in range(world_size)]
    expected_len = (23 // world_size) // 3
    assert [len(s) for s in ranks] == [expected_len] * world_size
    train_ids = {i for p, i in index.items() if "/train/" in p}
    sizes = shard_sizes(23, world_size)
    reader = [record_reader(s) for s in ranks]
    seen_over_epochs: set[int] = set()
    orders = []
    for epoch in range(world_size + 1):
        seen = []
        read = []
        for r, s in enumerate(ranks):
            start = len(reader[r])
            batches = list(s)
            assert len(batches) == expected_len
            seen += [i for x, _ in batches for i in ids(x)]
            # What the reader produced this epoch: the shard's images, then padding.
            produced = [i for b in reader[r][start:] for i in b]
            real, padding = produced[: sizes[r]], produced[sizes[r] :]
            assert padding == real[: len(padding)]  # whole batches: the shard's start again, never yielded
            read += real
        # Every training image is read exactly once per epoch across the ranks ...
        assert sorted(read) == sorted(train_ids), epoch
        # ... and the yielded batches are disjoint (the < world_size * batch_size rest is dropped).
        assert len(seen) == len(set(seen)) == world_size * expected_len * 3
        seen_over_epochs |= set(seen)
        orders.append(read)
    assert all(s.epoch == world_size + 1 for s in ranks)
    assert len({tuple(o) for o in orders}) == len(orders)  # a new global order every epoch
    assert seen_over_epochs == train_ids  # what one epoch drops, another one uses


@pytest.mark.parametrize("world_size", [2, 3])
def test_multi_rank_shuffle_is_seeded(tree, make_cfg, world_size):
    root, _ = two_class_tree(tree, n_train=24)
    cfg = make_cfg(batch_size=2)

    def epochs(seed, n=3):
        ranks = [source(cfg, root, rank=r, world_size=world_size, seed=seed) for r in range(world_size)]
        return [[ids(x) for s in ranks for x, _ in s] for _ in range(n)]

    a, b, c = epochs(7), epochs(7), epochs(8)
    assert a == b  # same seed, same order on every rank, epoch after epoch
    assert a[0] != a[1] != a[2]  # a different order each epoch
    assert a != c  # another seed, another order


@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 4), (3, 2), (4, 3)])
def test_val_union_covers_every_image_once(tree, make_cfg, world_size, batch_size):
    root, index = two_class_tree(tree, n_val=11)
    cfg = make_cfg(batch_size=batch_size)
    val_ids = sorted(i for p, i in index.items() if "/val/" in p)
    ranks = [source(cfg, root, split="val", rank=r, world_size=world_size) for r in range(world_size)]
    sizes = shard_sizes(11, world_size)
    for _ in range(2):  # a second pass sees the same images: the readers stay aligned
        got = []
        for r, s in enumerate(ranks):
            batches = list(s)
            assert len(batches) == len(s) == -(-sizes[r] // batch_size)
            assert all(len(y) == batch_size for _, y in batches[:-1])
            got += [i for x, _ in batches for i in ids(x)]
        assert sorted(got) == val_ids


def test_abandoned_val_pass_restarts_from_the_beginning(tree, make_cfg):
    root, index = two_class_tree(tree)
    src = source(make_cfg(), root, split="val")
    first = next(iter(src))
    full = [i for x, _ in src for i in ids(x)]
    assert full[:4] == ids(first[0]) and len(full) == 10


# -- shuffling -----------------------------------------------------------------------------------


def epoch_ids(src):
    return [i for x, _ in src for i in ids(x)]


def test_shuffle_is_seeded_and_changes_every_epoch(tree, make_cfg):
    root, _ = two_class_tree(tree)
    cfg = make_cfg()
    a, b, c = (source(cfg, root, seed=s) for s in (1, 1, 2))
    a0, a1 = epoch_ids(a), epoch_ids(a)
    assert (a0, a1) == (epoch_ids(b), epoch_ids(b))
    assert a0 != a1 and sorted(a0) == sorted(a1)
    assert epoch_ids(c) != a0


# -- exact resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["cifar", "imagenet"])
@pytest.mark.parametrize("prefetch", [1, 3])
@pytest.mark.parametrize("n_before", [0, 2, 6, 7])  # start, mid-epoch, end of epoch 1, into epoch 2
def test_exact_resume(tree, make_cfg, style, prefetch, n_before):
    root, _ = two_class_tree(tree, n_train=26, size=(20, 20))  # 26 // 4 = 6 batches, 2 images dropped
    cfg = make_cfg(style=style, prefetch=prefetch)
    src = source(cfg, root, seed=3)
    take(src, n_before)
    state = roundtrip(src.state_dict())
    after = take(src, 8)

    resumed = source(cfg, root, seed=3)
    resumed.load_state_dict(state)
    again = take(resumed, 8)
    for (x1, y1), (x2, y2) in zip(after, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_inside_an_epoch_finishes_that_epoch(tree, make_cfg):
    root, _ = two_class_tree(tree)
    cfg = make_cfg()
    src = source(cfg, root)
    it = iter(src)
    for _ in range(4):
        next(it)
    state = src.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 4)
    resumed = source(cfg, root)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 2 and resumed.epoch == 1
    assert len(list(resumed)) == 6 and resumed.epoch == 2


def test_position_counts_an_epoch_done_at_its_last_batch_and_start_epoch_jumps_there(tree, make_cfg):
    root, _ = two_class_tree(tree)
    cfg = make_cfg()
    src = source(cfg, root, seed=3)
    it = iter(src)
    for _ in range(len(src) - 1):
        next(it)
    assert src.position == (0, len(src) - 1)
    next(it)
    assert src.position == (1, 0) and src.epoch == 1, "an epoch whose last batch was yielded is complete"
    assert (src.state_dict()["epoch"], src.state_dict()["batch"]) == (0, len(src))  # the reader's rest is unread
    second = epoch_ids(src)
    jumped = source(cfg, root, seed=3)
    jumped.start_epoch(1)  # a resume on another number of ranks: that epoch's own order, from its start
    assert jumped.position == (1, 0) and epoch_ids(jumped) == second and jumped.position == (2, 0)


def test_state_from_another_world_size_is_refused(tree, make_cfg):
    root, _ = two_class_tree(tree)
    cfg = make_cfg()
    state = source(cfg, root, world_size=2).state_dict()
    with pytest.raises(DataError, match="world_size = 2 but this source has 1"):
        source(cfg, root).load_state_dict(state)
    with pytest.raises(DataError, match="not a 'dali' state"):
        source(cfg, root).load_state_dict({"kind": "synthetic", "format": 1, "epoch": 0, "batch": 0})


def test_load_state_after_iterating_restarts_cleanly(tree, make_cfg):
    root, _ = two_class_tree(tree)
    cfg = make_cfg()
    src = source(cfg, root)
    state = src.state_dict()
    expected = epoch_ids(src)
    stale = iter(src)
    next(stale)
    src.load_state_dict(state)
    assert list(stale) == []  # cut off: it belonged to the old position
    assert epoch_ids(src) == expected


# -- misc ----------------------------------------------------------------------------------------


def test_too_few_images_for_one_batch_per_rank(tree, make_cfg):
    root, _ = two_class_tree(tree, n_train=10)
    with pytest.raises(DataError, match=r"fewer than world_size \* batch_size = 3 \* 4.*--data.batch_size"):
        source(make_cfg(), root, world_size=3)


def test_decoder_resolution_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only fallback")
    assert resolve_decoder("auto", CPU) == "cpu"
    assert resolve_decoder("cpu", CPU) == "cpu"
    with pytest.raises(DataError, match="--data.decoder=cpu"):
        resolve_decoder("mixed", CPU)


def test_val_needs_an_image_per_rank(tree, make_cfg):
    root, _ = two_class_tree(tree, n_val=2)
    with pytest.raises(DataError, match="fewer than the 3 ranks"):
        source(make_cfg(), root, split="val", world_size=3)


def _mixed_graphs():
    from pipeline.data.pipelines import TrainAugment, train_pipeline, val_pipeline

    mean_image = np.zeros((16, 16, 3), np.float32)
    for style in ("cifar", "imagenet"):
        common = dict(
            files=["a.jpg", "b.jpg"],
            labels=[0, 1],
            style=style,
            image_size=16,
            mean=MEAN,
            std=STD,
            decoder="mixed",
            batch_size=2,
            num_threads=1,
            device_id=None,
            seed=1,
        )
        yield f"{style}-train", 2, train_pipeline(enable_checkpointing=True, **common)
        yield f"{style}-val", 2, val_pipeline(val_resize=18, **common)
    common.update(style="imagenet")
    paper = TrainAugment(augment="paper", scale=(16, 20), lighting=0.1)
    yield "paper+lighting+mean", 2, train_pipeline(augmentation=paper, mean_image=mean_image, **common)
    yield "rrc+lighting", 2, train_pipeline(augmentation=TrainAugment(augment="rrc", lighting=0.1), **common)
    yield "10crop+mean", 2, val_pipeline(val_resize=18, eval_mode="10crop", mean_image=mean_image, **common)
    yield "multiscale", 4, val_pipeline(val_resize=18, eval_mode="multiscale", scales=(16, 20, 24), **common)


def test_mixed_graphs_are_well_formed_without_a_gpu():
    # Defining the graph checks every operator argument against DALI's schema and places the
    # outputs, without the CUDA context that building would need: the most a CPU machine can do.
    for name, outputs, pipe in _mixed_graphs():
        if not hasattr(pipe, "_build_graph"):
            pytest.skip("this DALI version has no graph-only build step")
        pipe._build_graph()
        assert [o.device for o in pipe._graph_outputs] == ["gpu"] * outputs, name


def test_jpeg_and_upper_case_extensions_decode(tree, make_cfg):
    root, _ = tree({"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}}, ext=".JPEG")
    src = source(make_cfg(), root)
    x, y = next(iter(src))
    assert x.shape == (4, 3, 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("style", ["cifar", "imagenet"])
def test_mixed_decoder_on_gpu(tree, make_cfg, style):
    root, index = two_class_tree(tree, size=(20, 20))
    gpu = torch.device("cuda", torch.cuda.current_device())
    cfg = make_cfg(style=style, decoder="mixed")
    for split in ("train", "val"):
        src = build_source(cfg, split=split, rank=0, world_size=1, device=gpu, seed=0, num_classes=2, root=root)
        cpu = source(make_cfg(style=style), root, split=split)
        got = list(src)
        assert all(
            x.device == gpu and y.device == gpu and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in got
        )
        if split == "val":  # deterministic: GPU and CPU decoding agree (PNGs are lossless)
            for (x, y), (xc, yc) in zip(got, cpu, strict=True):
                assert torch.equal(y.cpu(), yc) and torch.allclose(x.cpu(), xc, atol=0.05)
    # exact resume on the GPU path too
    src = build_source(cfg, split="train", rank=0, world_size=1, device=gpu, seed=0, num_classes=2, root=root)
    take(src, 3)
    state = roundtrip(src.state_dict())
    after = take(src, 5)
    resumed = build_source(cfg, split="train", rank=0, world_size=1, device=gpu, seed=0, num_classes=2, root=root)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, take(resumed, 5), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
