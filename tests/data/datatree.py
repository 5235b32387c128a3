"""Tiny generated ImageFolder trees for the data-layer tests (helpers; fixtures are in conftest.py).

Images are solid colours whose red channel encodes a global index (and PNGs, so the colour survives
exactly), which lets a test identify every image in a batch after decoding and normalisation: the
CIFAR crop keeps the centre pixel inside the image, and flips don't change a solid colour.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

MEAN = [120.0, 110.0, 100.0]
STD = [60.0, 50.0, 40.0]


def write_tree(
    root: str,
    layout: dict[str, dict[str, int]],
    *,
    size: tuple[int, int] = (16, 16),
    ext: str = ".png",
    pattern: str = "solid",
) -> dict[str, int]:
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
                    pixels[:, w // 2 :, 2] = 200
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


# -- ILSVRC-2012-format archives -----------------------------------------------------------------

WNIDS = ("n01440764", "n01443537", "n01484850")


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(120, 40, (*size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_meta_mat(path: str, wnids: tuple[str, ...], *, inner_nodes: int = 2) -> None:
    """A devkit ``meta.mat``: a ``synsets`` struct array like ILSVRC-2012's (leaves first, ids 1..N,
    then WordNet inner nodes with children, which are not classes)."""
    import scipy.io

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [(i + 1, w, f"class {i}", f"gloss {i}", 0, np.zeros((0,), np.float64), 0, 4) for i, w in enumerate(wnids)]
    rows += [
        (len(wnids) + 1 + k, f"n0999999{k}", f"inner {k}", "an inner node", 2, np.array([1.0, 2.0]), 1, 0)
        for k in range(inner_nodes)
    ]
    arr = np.zeros((len(rows),), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        arr[i] = row
    scipy.io.savemat(path, {"synsets": arr})


def write_ilsvrc_archives(
    folder: str,
    *,
    wnids: tuple[str, ...] = WNIDS,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (20, 28),
) -> dict:
    """Tiny archives in the official ILSVRC-2012 formats: a tar of per-class tars, a flat val tar,
    the devkit (ground truth + meta.mat, as .tar.gz) and a LOC_val_solution.csv.

    Returns their paths and the expected tree: ``{"train": {wnid: {name: bytes}}, "val": {...}}``.
    """
    import io
    import os
    import tarfile

    os.makedirs(folder, exist_ok=True)
    expected: dict[str, dict[str, dict[str, bytes]]] = {"train": {}, "val": {}}
    paths = {
        k: os.path.join(folder, n)
        for k, n in (
            ("train", "ILSVRC2012_img_train.tar"),
            ("val", "ILSVRC2012_img_val.tar"),
            ("devkit", "ILSVRC2012_devkit_t12.tar.gz"),
            ("csv", "LOC_val_solution.csv"),
        )
    }
    seed = 0
    with tarfile.open(paths["train"], "w") as outer:
        for w in wnids:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in range(train_per_class):
                    name, data = f"{w}_{k + 1}.JPEG", _jpeg(seed, size)
                    seed += 1
                    _add(inner, name, data)
                    expected["train"].setdefault(w, {})[name] = data
            _add(outer, f"{w}.tar", buf.getvalue())
    # Validation images of all classes interleaved, as in the real archive.
    order = [w for _ in range(val_per_class) for w in wnids]
    order = [order[i] for i in np.random.default_rng(1).permutation(len(order))]
    truth = []
    with tarfile.open(paths["val"], "w") as tar:
        for i, w in enumerate(order, 1):
            name, data = f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(1000 + i, size)
            _add(tar, name, data)
            expected["val"].setdefault(w, {})[name] = data
            truth.append(wnids.index(w) + 1)
    meta = os.path.join(folder, "meta.mat")
    write_meta_mat(meta, wnids)
    with tarfile.open(paths["devkit"], "w:gz") as tar:
        with open(meta, "rb") as f:
            _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", f.read())
        _add(
            tar,
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "".join(f"{t}\n" for t in truth).encode(),
        )
        _add(tar, "ILSVRC2012_devkit_t12/readme.txt", b"devkit")
    os.remove(meta)
    with open(paths["csv"], "w") as f:
        f.write("ImageId,PredictionString\n")
        for i, w in enumerate(order, 1):
            f.write(f"ILSVRC2012_val_{i:08d},{w} 1 2 10 12 {w} 3 4 8 9\n")
    return {"paths": paths, "expected": expected}


# -- sharded splits ------------------------------------------------------------------------------


def _png(i: int, size: tuple[int, int] = (16, 16)) -> bytes:
    import io

    pixels = np.zeros((*size, 3), np.uint8)
    pixels[..., 0] = i
    pixels[..., 1] = 7 * (i % 2)
    pixels[..., 2] = 50
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless: the id survives (DALI sniffs the format)
    return buf.getvalue()


def write_sharded_split(folder: str, sizes: list[int], *, first_id: int = 0, num_classes: int = 2) -> dict[int, int]:
    """A sharded split (pipeline.data.shard_format) at local ``folder``: shard k holds ``sizes[k]`` images.

    Image ids run from ``first_id`` in shard order, encoded as in :func:`write_tree` (red = id; at most 256 in a
    tree); the label of id i is ``i % num_classes``. Returns ``{id: label}``.
    """
    from pipeline.core.storage import Storage
    from pipeline.data.shard_format import ShardManifest, shard_name, write_manifest, write_shard

    os.makedirs(folder, exist_ok=True)
    shards, labels, i = [], {}, first_id
    for k, n in enumerate(sizes):
        samples = [(f"{j:06d}", _png(j), j % num_classes) for j in range(i, i + n)]
        labels.update({j: j % num_classes for j in range(i, i + n)})
        shards.append(write_shard(os.path.join(folder, shard_name(k)), samples))
        i += n
    assert i <= 256
    write_manifest(Storage(folder), ShardManifest(num_classes=num_classes, shards=shards))
    return labels


# -- reading sources -------------------------------------------------------------------------------


def take(src, n):
    """The next n batches, continuing across epochs."""
    out = []
    while len(out) < n:
        for batch in src:
            out.append(batch)
            if len(out) == n:
                break
    return out


def record_reader(src) -> list[list[int]]:
    """Record every batch the source's DALI pipelines produce (yielded or dropped by the loader):
    one list of image ids per reader batch."""
    batches: list[list[int]] = []
    real_run = src._run

    def run(pipe, *args):
        out = real_run(pipe, *args)
        batches.append(ids(torch.from_numpy(np.array(out[0].as_tensor()))))
        return out

    src._run = run
    return batches


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, as it was afterwards (DALI and s3fs read it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
