"""Tiny generated ImageFolder trees for the data-layer tests (helpers; fixtures are in conftest.py).

Images are solid colours whose red channel encodes a global index (and PNGs, so the colour survives
exactly), which lets a test identify every image in a batch after decoding and normalisation: the
CIFAR crop keeps the centre pixel inside the image, and flips don't change a solid colour.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

MEAN = [120.0, 110.0, 100.0]
STD = [60.0, 50.0, 40.0]


def write_tree(root: str, layout: dict[str, dict[str, int]], *, size: tuple[int, int] = (16, 16),
               ext: str = ".png", pattern: str = "solid") -> dict[str, int]:
    """Write ``root/<split>/<class>/<k>.png`` for ``layout = {split: {class: count}}``.

    Returns ``{path: index}``; index i is stored as red = i (so at most 256 images per tree),
    green = 7 * class position, blue = 50. ``pattern="halves"`` makes the right half brighter, so a flip is
    visible.
    """
    index: dict[str, int] = {}
    i = 0
    h, w = size
    for split, classes in layout.items():
        for c, (name, count) in enumerate(sorted(classes.items())):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for k in range(count):
                pixels = np.zeros((h, w, 3), np.uint8)
                pixels[..., 0] = i
                pixels[..., 1] = 7 * c
                pixels[..., 2] = 50  # never black, so no image looks like the zero padding
                if pattern == "halves":
                    pixels[:, w // 2:, 2] = 200
                path = os.path.join(folder, f"{k:03d}{ext}")
                Image.fromarray(pixels).save(path, format="PNG" if ext.lower() == ".png" else "JPEG", quality=95)
                index[path] = i
                i += 1
    assert i <= 256
    return index


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Undo normalisation: NCHW float -> 0-255 values."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return images.cpu() * std + mean


def ids(images: torch.Tensor) -> list[int]:
    """The index encoded in each image's centre pixel."""
    s = images.shape[-1]
    return pixel_values(images)[:, 0, s // 2, s // 2].round().long().tolist()
