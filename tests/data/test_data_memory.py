"""The in-memory source (CIFAR fast path): batches, augmentation, sharding, exactly-once val, exact resume.

Most tests hand the source its decoded images directly (``images=``), built so that every pixel names
its image, row and column: red = image id, green = row + 1, blue = column + 1. Zero padding is then
the only black, and a crop's offset and flip can be read back from any batch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.data import DataError, build_source
from pipeline.data.folder import SplitIndex
from pipeline.data.memory import CIFAR_PAD, InMemorySource
from pipeline.data.source import SourceOptions

S = 8  # image size: small, but wider than the 4-pixel padding
MEAN = [10.0, 20.0, 30.0]
STD = [2.0, 4.0, 8.0]


def coded_images(n: int, size: int = S) -> torch.Tensor:
    img = torch.zeros((n, size, size, 3), dtype=torch.uint8)
    img[..., 0] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)
    img[..., 1] = (torch.arange(size, dtype=torch.uint8) + 1).view(1, size, 1)
    img[..., 2] = (torch.arange(size, dtype=torch.uint8) + 1).view(1, 1, size)
    return img


def make(
    n: int = 30,
    *,
    split: str = "train",
    rank: int = 0,
    world: int = 1,
    batch: int = 4,
    seed: int = 0,
    flip: bool = True,
) -> InMemorySource:
    index = SplitIndex(
        path=f"/mem/{split}",
        classes=("a", "b", "c"),
        files=tuple(f"/mem/{i}.png" for i in range(n)),
        labels=tuple(i % 3 for i in range(n)),
    )
    options = SourceOptions(
        split=split, rank=rank, world_size=world, device=torch.device("cpu"), seed=seed, num_classes=3, batch_size=batch
    )
    return InMemorySource(index, options, image_size=S, mean=MEAN, std=STD, flip=flip, images=coded_images(n))


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation: NCHW float -> NHWC integer pixel values."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x * std + mean).round().long().permute(0, 2, 3, 1)


def decode_crop(img: torch.Tensor) -> tuple[int, int, int, bool]:
    """(image id, dy, dx, flipped) of one augmented HWC image; dy/dx are offsets in the padded frame."""
    inside = img[..., 1] > 0
    ident = int(img[..., 0][inside][0])
    ys, xs = torch.nonzero(inside, as_tuple=True)
    y0, x0 = int(ys.min()), int(xs.min())
    row0 = int(img[y0, x0, 1]) - 1
    cols = img[y0, :, 2][inside[y0]]
    flipped = bool(cols.numel() > 1 and cols[0] > cols[-1])
    col_at_x0 = int(img[y0, x0, 2]) - 1
    # Output pixel (i, j) shows padded pixel (dy + i, dx + j) (or dx + S-1-j when flipped); padded = source + PAD.
    dy = row0 + CIFAR_PAD - y0
    dx = col_at_x0 + CIFAR_PAD - ((S - 1 - x0) if flipped else x0)
    return ident, dy, dx, flipped


def ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return [decode_crop(im)[0] for im in pixels(batch[0])]


def test_train_batches_have_fixed_shape_dtype_and_layout():
    src = make(30, batch=4)
    assert len(src) == 7 and src.num_samples == 30 and src.num_classes == 3
    batches = list(src)
    assert len(batches) == 7
    for x, y in batches:
        assert x.shape == (4, 3, S, S) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (4,) and y.dtype == torch.int64
    for x, y in batches:
        assert y.tolist() == [i % 3 for i in ids((x, y))], "labels travel with their images"


def test_augmentation_is_pad4_crop_and_flip_and_covers_every_offset():
    src = make(60, batch=10)
    seen_offsets, flips = set(), []
    for _ in range(4):
        for x, _ in src:
            px = pixels(x)
            for im in px:
                ident, dy, dx, flipped = decode_crop(im)
                assert 0 <= dy <= 2 * CIFAR_PAD and 0 <= dx <= 2 * CIFAR_PAD
                seen_offsets.add((dy, dx))
                flips.append(flipped)
                # Rebuild the expected crop from the offsets and compare every pixel, padding included.
                padded = torch.zeros((S + 2 * CIFAR_PAD, S + 2 * CIFAR_PAD, 3), dtype=torch.long)
                padded[CIFAR_PAD:-CIFAR_PAD, CIFAR_PAD:-CIFAR_PAD] = coded_images(60)[ident].long()
                want = padded[dy : dy + S, dx : dx + S]
                if flipped:
                    want = want.flip(1)
                assert torch.equal(im, want)
    assert {dy for dy, _ in seen_offsets} == {dx for _, dx in seen_offsets} == set(range(2 * CIFAR_PAD + 1))
    # Over more epochs every one of the 81 (dy, dx) pairs comes up.
    pairs = {(int(a), int(b)) for e in range(10) for a, b in zip(src.plan(e)["dy"], src.plan(e)["dx"], strict=True)}
    assert len(pairs) == (2 * CIFAR_PAD + 1) ** 2
    assert 0.35 < sum(flips) / len(flips) < 0.65


def test_no_flip_when_disabled():
    src = make(40, batch=8, flip=False)
    assert not any(decode_crop(im)[3] for x, _ in src for im in pixels(x))


@pytest.mark.parametrize("world", [1, 3])
def test_train_epochs_are_sharded_disjoint_equal_and_reshuffled(world):
    n, batch = 31, 4
    srcs = [make(n, rank=r, world=world, batch=batch) for r in range(world)]
    assert len({len(s) for s in srcs}) == 1, "every rank yields the same number of batches"
    epochs = []
    for _ in range(2):
        per_rank = [sum((ids(b) for b in s), []) for s in srcs]
        for seen in per_rank:
            assert len(seen) == len(srcs[0]) * batch and len(set(seen)) == len(seen)
        for a, b in itertools.combinations(per_rank, 2):
            assert not set(a) & set(b)
        epochs.append(per_rank)
    assert epochs[0] != epochs[1], "each epoch draws a new permutation"
    assert all(s.epoch == 2 for s in srcs)


def test_val_yields_every_image_once_across_ranks_in_order():
    n, world = 22, 3
    srcs = [make(n, split="val", rank=r, world=world, batch=4) for r in range(world)]
    seen = []
    for s in srcs:
        batches = list(s)
        assert len(batches) == len(s)
        assert [b[0].shape[0] for b in batches][:-1] == [4] * (len(batches) - 1)
        seen += sum((ids(b) for b in batches), [])
        # Every pass is the same, complete pass, even after an abandoned one.
        it = iter(s)
        next(it)
        assert sum((ids(b) for b in s), []) == sum((ids(b) for b in batches), [])
    assert seen == list(range(n))
    for x, _ in srcs[0]:
        px = pixels(x)
        assert (px[..., 1] > 0).all(), "validation images are not padded or cropped"


@pytest.mark.parametrize("stop_after", [3, 7, 10])
def test_resume_gives_identical_batches(stop_after):
    ref = make(30, batch=4, seed=5)
    stream = [b for _ in range(3) for b in ref]  # 3 epochs of 7 batches
    run = make(30, batch=4, seed=5)
    it = iter(run)
    got = []
    for _ in range(stop_after):
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(run)
            got.append(next(it))
    state = run.state_dict()
    resumed = make(30, batch=4, seed=5)
    resumed.load_state_dict(state)
    while len(got) < len(stream):
        got += list(resumed)
    for (xa, ya), (xb, yb) in zip(stream, got, strict=False):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_seed_and_rank_change_the_draws():
    a, b, c = make(30, seed=1), make(30, seed=2), make(30, seed=1)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])
    assert torch.equal(next(iter(make(30, seed=1)))[0], next(iter(c))[0])
    plans = [make(30, rank=r, world=2, seed=1).plan(0) for r in range(2)]
    assert not torch.equal(plans[0]["dx"], plans[1]["dx"]), "ranks draw their own crops"


def test_load_state_refuses_a_different_job():
    state = make(30, seed=1).state_dict()
    for other in (make(30, seed=2), make(30, world=2), make(30, batch=5), make(31)):
        with pytest.raises(DataError, match="exact resume needs the same"):
            other.load_state_dict(state)
    with pytest.raises(DataError, match="'memory'"):
        make(30).load_state_dict({**state, "kind": "dali"})


def test_too_small_splits_fail_clearly():
    with pytest.raises(DataError, match="no full batch"):
        make(7, world=2, batch=4)
    with pytest.raises(DataError, match="fewer than the 3 ranks"):
        make(2, split="val", world=3)


def test_build_source_decodes_an_image_folder_with_dali(make_cfg, tree):
    from PIL import Image

    root, index = tree({"train": {"a": 5, "b": 4}, "val": {"a": 3, "b": 2}}, size=(12, 12))
    cfg = make_cfg(root=root, in_memory=True, image_size=12, batch_size=4, val_batch_size=5)
    train = build_source(
        cfg, split="train", rank=0, world_size=1, device=torch.device("cpu"), seed=0, num_classes=2, root=root
    )
    val = build_source(
        cfg, split="val", rank=0, world_size=1, device=torch.device("cpu"), seed=0, num_classes=2, root=root
    )
    assert isinstance(train, InMemorySource) and isinstance(val, InMemorySource)
    assert (train.num_samples, len(train), val.num_samples, len(val)) == (9, 2, 5, 1)
    # The decoded split matches PIL, pixel for pixel (PNG is lossless), in index order.
    for src in (train, val):
        want = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in src.index.files])
        images = src._images if src.split == "val" else src._images[:, CIFAR_PAD:-CIFAR_PAD, CIFAR_PAD:-CIFAR_PAD]
        assert np.array_equal(images.numpy(), want)
    x, y = next(iter(val))
    assert x.shape == (5, 3, 12, 12) and y.tolist() == [0, 0, 0, 1, 1]


def test_in_memory_needs_cifar_style_image_data():
    from pipeline.config import ConfigError, DataConfig

    for bad in (dict(source="synthetic"), dict(style="imagenet", source="digits")):
        with pytest.raises(ConfigError, match="in_memory"):
            DataConfig(in_memory=True, **bad).validate()


@pytest.mark.parametrize("bad", ["zero-byte", "truncated"])
def test_a_bad_image_stops_decoding_with_its_path(make_cfg, tree, bad):
    import io
    from pathlib import Path

    from PIL import Image

    root, index = tree({"train": {"a": 5, "b": 4}, "val": {"a": 3, "b": 2}}, size=(12, 12))
    path = Path(root) / "train" / "b" / "broken.jpg"
    buf = io.BytesIO()
    Image.effect_noise((12, 12), 64).convert("RGB").save(buf, format="JPEG")
    path.write_bytes(b"" if bad == "zero-byte" else buf.getvalue()[:200])
    cfg = make_cfg(root=root, in_memory=True, image_size=12, batch_size=4)
    with pytest.raises(DataError, match="broken.jpg") as err:
        build_source(
            cfg, split="train", rank=0, world_size=1, device=torch.device("cpu"), seed=0, num_classes=2, root=root
        )
    assert str(path) in str(err.value) and f"pipeline.tools.validate {root} " in str(err.value)
