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

import fcntl
import json
import os
import shutil
import tempfile

from .errors import DataError

DIGITS_DIR = "digits"
_VERSION = 1  # bump when the images or the split change; an older tree is then rebuilt
_MARKER = ".complete"
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0
_IMAGE_SIZE = 32


def prepare_digits(cache_dir: str) -> str:
    """Build the digits tree under ``cache_dir`` once, and return its (absolute) root.

    Safe to call from many ranks at once, on one node or several sharing a filesystem: the tree
    is written to a private temporary folder and renamed into place, so readers only ever see a
    complete tree; a file lock keeps ranks of one node from all doing the (few-second) work.
    """
    cache_dir = os.path.abspath(cache_dir)
    root = os.path.join(cache_dir, DIGITS_DIR)
    if _is_complete(root):
        return root
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data.cache_dir {cache_dir}: {e}; "
                        f"set --data.cache_dir to a writable folder") from e
    with open(os.path.join(cache_dir, f".{DIGITS_DIR}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_complete(root):
                _build(cache_dir, root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def _is_complete(root: str) -> bool:
    try:
        with open(os.path.join(root, _MARKER)) as f:
            return json.load(f).get("version") == _VERSION
    except (OSError, ValueError):
        return False


def _build(cache_dir: str, root: str) -> None:
    tmp = tempfile.mkdtemp(prefix=f".{DIGITS_DIR}-tmp-", dir=cache_dir)
    try:
        counts = _write_tree(tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"version": _VERSION, **counts}, f)
        if _is_complete(root):
            return  # another node finished first, through a shared filesystem
        if os.path.exists(root):
            # A stale version or a half-copied tree not made by us: move it aside first, since
            # rename() cannot replace a non-empty directory.
            stale = tempfile.mkdtemp(prefix=f".{DIGITS_DIR}-stale-", dir=cache_dir)
            os.rename(root, os.path.join(stale, DIGITS_DIR))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another node won the race through a shared filesystem; its tree is identical.
            if not _is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    for split, indices in (("train", train), ("val", val)):
        for c in range(10):
            os.makedirs(os.path.join(out, split, str(c)), exist_ok=True)
        for i in indices:
            img = Image.fromarray(images[i]).resize((_IMAGE_SIZE, _IMAGE_SIZE), Image.Resampling.BICUBIC)
            img.convert("RGB").save(os.path.join(out, split, str(int(digits.target[i])), f"{i:04d}.jpg"), quality=95)
    return {"train": len(train), "val": len(val), "classes": 10}
