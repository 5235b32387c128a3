"""The per-pixel mean image of a tree's training split (``python -m pipeline.tools.prepare mean-image``), written
as ``mean_image.npy`` for data.mean_image."""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.storage import Storage
from pipeline.data.folder import is_url, scan_split
from pipeline.tools.progress import progress_bar

MEAN_IMAGE = "mean_image.npy"


def compute_mean_image(
    tree_url: str,
    *,
    size: int = 224,
    resize: int = 256,
    samples: int = 10000,
    split: str = "train",
    workers: int = 8,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """The per-pixel mean (size x size x 3, float32, 0-255) of training images seen as the centre-crop
    evaluation sees them (shorter side ``resize``, centre ``size`` crop), over up to ``samples`` images
    spread evenly across the classes (the first files of each class, so the result is reproducible)."""
    root = tree_url.rstrip("/")
    split_path = f"{root}/{split}" if is_url(root) else os.path.join(root, split)
    index = scan_split(split_path)
    per_class = max(1, math.ceil(samples / len(index.classes)))
    chosen: list[str] = []
    counts: dict[int, int] = {}
    for path, label in zip(index.files, index.labels, strict=True):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            chosen.append(path)

    def load(path: str) -> np.ndarray:
        folder, name = Storage.of_file(path)
        data = folder.read_bytes(name)
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float64)

    total = np.zeros((size, size, 3), np.float64)
    bar = progress_bar(len(chosen), enabled=progress, desc="mean image")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for arr in pool.map(load, chosen):
            total += arr
            bar.update(1)
    bar.close()
    return (total / len(chosen)).astype(np.float32), len(chosen)


def write_mean_image(
    tree_url: str, *, size: int = 224, resize: int = 256, samples: int = 10000, workers: int = 8, progress: bool = True
) -> dict[str, Any]:
    mean, n = compute_mean_image(
        tree_url, size=size, resize=resize, samples=samples, workers=workers, progress=progress
    )
    buf = io.BytesIO()
    np.save(buf, mean, allow_pickle=False)
    Storage(tree_url).write_bytes(MEAN_IMAGE, buf.getvalue())
    return {
        "file": MEAN_IMAGE,
        "size": size,
        "resize": resize,
        "samples": n,
        "channel_mean": [round(float(v), 3) for v in mean.mean(axis=(0, 1))],
    }
