"""Evaluation views: centre crop, the paper's 10-crop test and fully-convolutional multi-scale testing,
checked against hand-computed geometry, and every validation image scored exactly once across ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datatree import ids, pixel_values
from PIL import Image

from pipeline.data import DataError, build_source
from pipeline.data.pipelines import TEN_CROP_VIEWS
from pipeline.data.source import shard_sizes

CPU = torch.device("cpu")
W, H = 20, 24  # the test image: 20 wide, 24 tall, so val_resize = 20 leaves it unscaled


def coordinate_tree(root):
    """Every image: red = 8x + 4, green = 8y + 4 (x, y = source pixel), blue = 50."""
    px = np.zeros((H, W, 3), np.uint8)
    px[..., 0] = (8 * np.arange(W) + 4)[None, :]
    px[..., 1] = (8 * np.arange(H) + 4)[:, None]
    px[..., 2] = 50
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            Image.fromarray(px).save(os.path.join(root, split, cls, "0.png"))
    return str(root)


def val_source(cfg, root, mode, *, rank=0, world_size=1, scales=(16, 20, 30)):
    return build_source(
        cfg,
        split="val",
        rank=rank,
        world_size=world_size,
        device=CPU,
        seed=0,
        num_classes=2,
        root=root,
        eval_mode=mode,
        scales=scales,
    )


def test_ten_crop_geometry_by_hand(tmp_path, make_cfg):
    root = coordinate_tree(tmp_path / "ds")
    cfg = make_cfg(style="imagenet", image_size=16, val_resize=20, batch_size=2)
    ((x, y),) = list(val_source(cfg, root, "10crop"))
    assert x.shape == (2, 10, 3, 16, 16) and y.tolist() == [0, 1]
    # Crop anchors in a 20 x 24 image for a 16 x 16 crop: x in {0, 4}, y in {0, 8}; the centre (2, 4).
    anchors = {(0.0, 0.0): (0, 0), (1.0, 0.0): (4, 0), (0.0, 1.0): (0, 8), (1.0, 1.0): (4, 8), (0.5, 0.5): (2, 4)}
    assert [v[:2] for v in TEN_CROP_VIEWS[::2]] == list(anchors)
    for v, (px, py, mirrored) in enumerate(TEN_CROP_VIEWS):
        x0, y0 = anchors[(px, py)]
        red = torch.tensor([8.0 * (x0 + j) + 4 for j in range(16)])
        green = torch.tensor([8.0 * (y0 + i) + 4 for i in range(16)])
        if mirrored:
            red = red.flip(0)
        values = pixel_values(x[0, v][None])[0]  # (3, 16, 16)
        assert torch.allclose(values[0], red[None, :].expand(16, 16), atol=0.5), (v, values[0, 0])
        assert torch.allclose(values[1], green[:, None].expand(16, 16), atol=0.5), v
    ((c, _),) = list(val_source(cfg, root, "center"))
    assert torch.equal(c, x[:, 8])  # the centre view of 10-crop is the single-crop test


def test_ten_crop_resizes_the_shorter_side_first(tmp_path, make_cfg):
    root = coordinate_tree(tmp_path / "ds")
    cfg = make_cfg(style="imagenet", image_size=16, val_resize=40, batch_size=2)
    ((x, _),) = list(val_source(cfg, root, "10crop"))
    red = pixel_values(x[0, 0][None])[0, 0, 8]  # top-left view of the 40 x 48 image: the first 16 of 40 columns
    slope = float(red[12] - red[3]) / 9
    assert abs(slope - 4.0) < 0.3 and float(red[0]) < 10  # half the source slope, from the left edge


def test_multiscale_outputs_whole_images_per_scale(tmp_path, make_cfg):
    root = coordinate_tree(tmp_path / "ds")
    cfg = make_cfg(style="imagenet", image_size=16, val_resize=20, batch_size=2)
    ((x, y),) = list(val_source(cfg, root, "multiscale", scales=(16, 20, 30)))
    assert len(x) == 3 and all(len(per_scale) == 2 for per_scale in x) and y.tolist() == [0, 1]
    # shorter side (width 20) to s: height 24 * s / 20, rounded
    assert [tuple(per_scale[0].shape) for per_scale in x] == [(3, 19, 16), (3, 24, 20), (3, 36, 30)]
    full = pixel_values(x[1][0][None])[0]
    assert torch.allclose(full[0, 0], torch.tensor([8.0 * j + 4 for j in range(20)]), atol=0.5)  # unscaled, uncropped


def solid_val_tree(tree, n_val):
    return tree({"train": {"a": 2, "b": 2}, "val": {"a": n_val // 2, "b": n_val - n_val // 2}}, size=(20, 20))


@pytest.mark.parametrize("mode", ["center", "10crop", "multiscale"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_val_image_once_across_ranks(tree, make_cfg, mode, world_size):
    root, index = solid_val_tree(tree, 11)
    val_ids = sorted(i for p, i in index.items() if "/val/" in p)
    cfg = make_cfg(style="imagenet", image_size=16, val_resize=18, batch_size=2)
    got = []
    sizes = shard_sizes(11, world_size)
    for r in range(world_size):
        src = val_source(cfg, root, mode, rank=r, world_size=world_size, scales=(16, 24))
        n = 0
        for x, y in src:
            if mode == "10crop":
                assert all(ids(x[:, v]) == ids(x[:, 8]) for v in range(10))
                got += ids(x[:, 8])
            elif mode == "multiscale":
                assert ids(torch.stack(x[0])) == ids(torch.stack(x[1]))
                got += ids(torch.stack(x[0]))
            else:
                got += ids(x)
            n += len(y)
        assert n == sizes[r]
    assert sorted(got) == val_ids


def test_eval_modes_need_imagenet_style_and_val(tree, make_cfg):
    root, _ = solid_val_tree(tree, 4)
    with pytest.raises(DataError, match="needs the val split and data.style = 'imagenet'"):
        val_source(make_cfg(style="cifar"), root, "10crop")
    with pytest.raises(DataError, match="needs the val split"):
        build_source(
            make_cfg(style="imagenet"),
            split="train",
            rank=0,
            world_size=1,
            device=CPU,
            seed=0,
            num_classes=2,
            root=root,
            eval_mode="multiscale",
        )
    with pytest.raises(DataError, match="is not one of center, 10crop, multiscale"):
        val_source(make_cfg(style="imagenet"), root, "5crop")
