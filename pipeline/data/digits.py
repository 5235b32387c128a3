"""The offline demo dataset: scikit-learn's handwritten digits as a small ImageFolder tree.

``load_digits`` ships inside scikit-learn (1,797 real 8x8 greyscale scans of 10 classes), so the
whole pipeline, DALI included, runs without any download. The images are written as 32x32 RGB
JPEGs, the CIFAR geometry, so the CIFAR networks and augmentation apply unchanged:

    <cache_dir>/digits/train/<0..9>/NNNN.jpg     (NNNN = index in load_digits)
    <cache_dir>/digits/val/<0..9>/NNNN.jpg

The split is stratified (20% of every class to val) and fixed by a constant seed, so every machine
and every rank builds byte-identical trees.
"""

from __future__ import annotations

import io
import os

from pipeline.core.storage import Storage
from pipeline.data.cache import build_once

DIGITS_DIR = "digits"
_VERSION = 1  # bump when the images or the split change; an older tree is then rebuilt
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0
_IMAGE_SIZE = 32


def prepare_digits(cache_dir: str) -> str:
    """Build the digits tree under ``cache_dir`` once, and return its (absolute) root.

    Safe to call from many ranks at once, on one node or several sharing a filesystem (see
    :func:`pipeline.data.cache.build_once`): readers only ever see a complete tree.
    """
    root = os.path.join(os.path.abspath(cache_dir), DIGITS_DIR)
    build_once(root, stamp={"version": _VERSION}, build=lambda tmp: _write_tree(str(tmp)))
    return root


def stratified_split(labels, *, val_fraction: float = _VAL_FRACTION, seed: int = _SPLIT_SEED):
    """Indices of (train, val): ``round(val_fraction * n_c)`` random images of each class go to val."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx)))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def _write_tree(out: str) -> dict[str, int]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # 0..16 ink levels
    train, val = stratified_split(digits.target)
    tree = Storage(out)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            img = Image.fromarray(images[i]).resize((_IMAGE_SIZE, _IMAGE_SIZE), Image.Resampling.BICUBIC)
            jpeg = io.BytesIO()
            img.convert("RGB").save(jpeg, format="JPEG", quality=95)
            tree.write_bytes(f"{split}/{int(digits.target[i])}/{i:04d}.jpg", jpeg.getvalue())
    return {"train": len(train), "val": len(val), "classes": 10}
