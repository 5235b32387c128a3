"""The paper's ImageNet training augmentation (section 3.4): scale augmentation, random crop, flip,
per-channel or per-pixel mean, and AlexNet's PCA lighting; random-resized crop as the modern recipe."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datatree import MEAN, STD, pixel_values
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, build_source
from pipeline.data.pipelines import PCA_EIGVAL, PCA_EIGVEC

CPU = torch.device("cpu")


def image_tree(root, pixels: np.ndarray, *, n_train=8, n_val=2):
    """Every image of both splits and both classes is ``pixels`` (H, W, 3 uint8), as PNG."""
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("a", "b"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for k in range(n // 2):
                Image.fromarray(pixels).save(os.path.join(root, split, cls, f"{k}.png"))
    return str(root)


def ramp(h=16, w=16, step=15):
    """Red = step * x, green = step * y, blue = 50."""
    px = np.zeros((h, w, 3), np.uint8)
    px[..., 0] = (np.arange(w) * step)[None, :]
    px[..., 1] = (np.arange(h) * step)[:, None]
    px[..., 2] = 50
    return px


def train_images(cfg, root, epochs):
    src = build_source(cfg, split="train", rank=0, world_size=1, device=CPU, seed=0, num_classes=2, root=root)
    return torch.cat([x for _ in range(epochs) for x, _ in src])


def test_scale_augmentation_draws_the_shorter_side_from_the_range(tmp_path, make_cfg):
    root = image_tree(tmp_path / "ds", ramp())
    cfg = make_cfg(style="imagenet", augment="paper", scale=[32, 48], flip=False)
    red = pixel_values(train_images(cfg, root, epochs=8))[:, 0]  # (N, 16, 16)
    # The 16-pixel ramp of slope 15 resized to s in [32, 48]: slope 15 * 16 / s per output pixel.
    slopes = (red[:, 8, 13] - red[:, 8, 2]) / 11
    assert float(slopes.min()) > 15 * 16 / 48 - 0.35 and float(slopes.max()) < 15 * 16 / 32 + 0.35
    assert float(slopes.max() - slopes.min()) > 1.0  # the length varies over the range
    # The crop position varies in both directions.
    assert len({round(v) for v in red[:, 8, 0].tolist()}) > 5
    green = pixel_values(train_images(cfg, root, epochs=2))[:, 1]
    assert len({round(v) for v in green[:, 0, 8].tolist()}) > 3


def test_integer_lengths_are_equally_likely(tmp_path, make_cfg):
    # A draw rounded from a continuous range would give the two end points half the weight.
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def
    def lengths():
        return fn.random.uniform(values=[float(v) for v in range(256, 259)])

    pipe = lengths(batch_size=300, num_threads=1, device_id=None, seed=1)
    pipe.build()
    values = np.array(pipe.run()[0].as_tensor()).ravel()
    counts = [int((values == v).sum()) for v in (256, 257, 258)]
    assert min(counts) > 70 and sum(counts) == 300


def test_pca_lighting_offsets_follow_the_alexnet_model(tmp_path, make_cfg):
    base = np.array([120, 110, 100], np.float32)
    root = image_tree(tmp_path / "ds", np.tile(base.astype(np.uint8), (16, 16, 1)), n_train=16)
    cfg = make_cfg(style="imagenet", augment="paper", scale=[16, 20], lighting=0.1, batch_size=8)
    x = pixel_values(train_images(cfg, root, epochs=12))  # (N, 3, 16, 16)
    offsets = x.mean(dim=(2, 3)) - torch.tensor(base)  # (N, 3): one RGB offset per image
    assert torch.allclose(x, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=0.05)  # the same for every pixel
    # offset = eigvec @ (alpha * eigval) * 255  =>  alpha = eigvec^-1 offset / (eigval * 255)
    vec, val = np.array(PCA_EIGVEC), np.array(PCA_EIGVAL)
    alpha = (np.linalg.inv(vec) @ offsets.numpy().T).T / (val * 255)
    assert alpha.shape[0] >= 190
    assert np.all(np.abs(alpha.mean(axis=0)) < 0.03)
    assert np.all((alpha.std(axis=0) > 0.075) & (alpha.std(axis=0) < 0.125))  # sigma 0.1 on each component
    assert abs(np.corrcoef(alpha.T)[0, 1]) < 0.25  # independent draws


def test_lighting_is_off_for_cifar_and_at_zero(tmp_path, make_cfg):
    base = np.array([120, 110, 100], np.uint8)
    root = image_tree(tmp_path / "ds", np.tile(base, (16, 16, 1)))
    for cfg in (make_cfg(style="imagenet", lighting=0.0), make_cfg(style="cifar", lighting=0.1)):
        x = pixel_values(train_images(cfg, root, epochs=1))
        centre = x[:, :, 8, 8]
        assert torch.allclose(centre, torch.tensor(base, dtype=torch.float32).expand_as(centre), atol=0.01)


def write_mean(path, mean):
    np.save(path, mean.astype(np.float32))
    return str(path)


def test_per_pixel_mean_image(tmp_path, make_cfg):
    value = 130
    root = image_tree(tmp_path / "ds", np.full((16, 16, 3), value, np.uint8))
    yy, xx, cc = np.meshgrid(np.arange(16), np.arange(16), np.arange(3), indexing="ij")
    mean = (yy * 3 + xx + cc * 10).astype(np.float32)  # (H, W, C)
    write_mean(tmp_path / "ds" / "mean_image.npy", mean)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    expected = torch.from_numpy(value - mean).permute(2, 0, 1)  # (C, H, W)
    # A relative data.mean_image is found under data.root; data.mean is not used then.
    for split, flip in (("val", False), ("train", False), ("train", True)):
        cfg = make_cfg(
            style="imagenet",
            mean_image="mean_image.npy",
            scale=[16, 16],
            val_resize=16,
            flip=flip,
            mean=[0.0, 0.0, 0.0],
        )
        src = build_source(cfg, split=split, rank=0, world_size=1, device=CPU, seed=0, num_classes=2, root=root)
        x = torch.cat([b for b, _ in src]) * std
        if not flip:
            assert torch.allclose(x, expected.expand_as(x), atol=1e-3), split
        else:  # mean subtracted from the crop, then mirrored with it
            flipped = [torch.allclose(img, expected.flip(-1), atol=1e-3) for img in x]
            plain = [torch.allclose(img, expected, atol=1e-3) for img in x]
            assert all(f or p for f, p in zip(flipped, plain, strict=True)) and any(flipped) and any(plain)


@pytest.mark.parametrize("in_memory", [False, True], ids=["dali", "in_memory"])
def test_cifar_per_pixel_mean_image_is_subtracted_before_the_padding(tmp_path, make_cfg, in_memory):
    """The paper's CIFAR preprocessing: the per-pixel mean subtracted, then 4 zero pixels (the mean) of padding and a
    random crop; both CIFAR sources do it the same way."""
    value = 130
    root = image_tree(tmp_path / "ds", np.full((16, 16, 3), value, np.uint8))
    yy, xx, cc = np.meshgrid(np.arange(16), np.arange(16), np.arange(3), indexing="ij")
    mean = (yy * 3 + xx + cc * 10).astype(np.float32)
    write_mean(tmp_path / "ds" / "mean_image.npy", mean)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    centred = torch.from_numpy(value - mean).permute(2, 0, 1)  # (C, H, W)
    padded = torch.nn.functional.pad(centred, (4, 4, 4, 4))  # pad pixels: the mean, 0 after subtraction
    crops = [padded[:, dy : dy + 16, dx : dx + 16] for dy in range(9) for dx in range(9)]
    cfg = make_cfg(style="cifar", mean_image="mean_image.npy", flip=False, in_memory=in_memory, mean=[99.0] * 3)
    for split in ("val", "train"):
        src = build_source(cfg, split=split, rank=0, world_size=1, device=CPU, seed=0, num_classes=2, root=root)
        x = torch.cat([b for b, _ in src]) * std
        if split == "val":
            assert torch.allclose(x, centred.expand_as(x), atol=1e-3)
        else:
            assert all(any(torch.allclose(img, c, atol=1e-3) for c in crops) for img in x)
            assert not all(torch.allclose(img, centred, atol=1e-3) for img in x)  # crops at several offsets


def test_mean_image_errors(tmp_path, make_cfg):
    root = image_tree(tmp_path / "ds", np.full((16, 16, 3), 9, np.uint8))
    bad = write_mean(tmp_path / "bad.npy", np.zeros((8, 8, 3)))
    with pytest.raises(DataError, match=r"bad.npy has shape \(8, 8, 3\), but data.image_size = 16 needs \(16, 16, 3\)"):
        build_source(
            make_cfg(style="imagenet", mean_image=bad),
            split="train",
            rank=0,
            world_size=1,
            device=CPU,
            seed=0,
            num_classes=2,
            root=root,
        )
    with pytest.raises(DataError, match=r"cannot read .*missing.npy.*prepare mean-image"):
        build_source(
            make_cfg(style="imagenet", mean_image="missing.npy"),
            split="val",
            rank=0,
            world_size=1,
            device=CPU,
            seed=0,
            num_classes=2,
            root=root,
        )


def test_random_resized_crop_stays_available(tmp_path, make_cfg):
    root = image_tree(tmp_path / "ds", ramp(24, 20, step=12))
    cfg = make_cfg(style="imagenet", augment="rrc", flip=False)
    red = pixel_values(train_images(cfg, root, epochs=6))[:, 0]
    assert red.shape[1:] == (16, 16)
    slopes = (red[:, 8, 13] - red[:, 8, 2]) / 11
    assert float(slopes.max() - slopes.min()) > 2  # zoom varies with the crop area


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[data]\nstyle = 'imagenet'\nimage_size = 224\nscale = [200, 480]\n", "data.scale = [200, 480] starts below"),
        ("[data]\nscale = [480, 256]\n", "data.scale = [480, 256]: must be [min, max]"),
        ("[data]\nscale = [256]\n", "data.scale = [256]"),
        ("[data]\nlighting = -0.1\n", "data.lighting = -0.1"),
        ("[data]\naugment = 'autoaugment'\n", "data.augment = 'autoaugment' is not allowed"),
    ],
)
def test_config_validation_names_the_key(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nname = 'resnet18'\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)


def test_normalisation_uses_data_mean_and_std(tmp_path, make_cfg):
    root = image_tree(tmp_path / "ds", np.full((16, 16, 3), 200, np.uint8))
    x = train_images(make_cfg(style="imagenet"), root, epochs=1)
    expected = (200 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x[:, :, 8, 8], expected.expand(len(x), 3), atol=1e-4)
