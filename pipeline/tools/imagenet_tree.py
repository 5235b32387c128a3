"""Prepare ImageNet (ILSVRC-2012) from its official archives as an ImageFolder tree, locally or on S3.

    python -m pipeline.tools.prepare imagenet \\
        --train-tar /archives/ILSVRC2012_img_train.tar --val-tar /archives/ILSVRC2012_img_val.tar \\
        --devkit /archives/ILSVRC2012_devkit_t12.tar.gz --out /datasets/imagenet     # or s3://bucket/imagenet
    python -m pipeline.tools.prepare imagenet --out /datasets/imagenet --verify     # re-check a prepared tree
    python -m pipeline.tools.prepare mean-image /datasets/imagenet                  # (re)compute the mean image
    python -m pipeline.tools.prepare shards /datasets/imagenet s3://bucket/imagenet-shards   # any ImageFolder tree
    python -m pipeline.tools.prepare imagenet ... --out /datasets/imagenet --format shards \\
        --shards-out s3://bucket/imagenet-shards         # the tree, then its splits as shards (--shard-bytes)

The tree it writes (the archives may be local files or URLs too)::

    train/<wnid>/<wnid>_NNNN.JPEG          1,281,167 images in 1,000 classes
    val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG    50,000 images
    .manifest/<split>/<wnid>.json          per class: every file's size and sha256
    mean_image.npy                         per-pixel mean (224 x 224 x 3, 0-255) for data.mean_image
    manifest.json                          per class: file count, bytes, sha256 of its file list; written last

Each archive is read once, as a stream (one image in memory at a time); images are written by a
pool of threads. A class becomes visible only when complete: locally it is written under
``.partial/`` and renamed into place; on S3 (no rename) objects are written in place and the class
counts as done once its ``.manifest`` entry exists, written after its files were listed back and
matched. An interrupted run is resumed by running the same command: classes whose entry matches
what is stored are skipped. The sizes are always checked against the manifest; ``--verify``
re-reads every file and checks its sha256 too.

Sharded splits (``shards``, or ``imagenet --format shards``): every split folder of an ImageFolder tree
(``train/``, ``val/``, ``test/``: local or s3://) becomes ``OUT/<split>/`` in the layout of
:mod:`pipeline.data.shard_format`: WebDataset tars of about ``--shard-bytes`` (256 MB by default) holding
``<key>.jpg`` + ``<key>.cls`` per sample, each with its DALI index, and the split's ``manifest.json``
(samples, bytes and sha256 per shard, the class names), written last. The samples are shuffled once
(``--seed``) before they are cut into shards, so that a contiguous read of one shard is class-mixed. The
member is named ``.jpg`` whatever the image's format (DALI decodes by content). Re-running rewrites the split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import posixpath
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipeline.core.storage import Storage, StorageError
from pipeline.data import shard_format
from pipeline.data.errors import DataError
from pipeline.data.folder import is_url, list_classes, scan_split
from pipeline.tools.ilsvrc import iter_train_classes, iter_val_images, open_input, read_devkit, read_loc_csv

DATASET_FORMAT = 1  # of the dataset manifest and its per-class records (not pipeline.checkpoint's manifests)
DATASET_MANIFEST = "manifest.json"
MEAN_IMAGE = "mean_image.npy"
PARTS = ".manifest"
STAGING = ".partial"
SPLITS = ("train", "val")


def _digest(files: dict[str, list]) -> str:
    """sha256 of a class's file list ({name: [size, sha256]}), recorded in manifest.json."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _PreparedTree:
    """The tree being prepared: where a class's files go while it is written, what is stored, and the per-class
    records (``.manifest/<split>/<class>.json``) that mark a class as done."""

    def __init__(self, out: str, *, write: bool = False) -> None:
        self.url = out.rstrip("/")
        self.remote = is_url(out)
        self.store = Storage(self.url)
        try:
            if write:
                self.store.check_access(write=True)
            elif not self.store.exists():
                raise DataError(f"{out} does not exist")
        except StorageError as e:
            raise DataError(f"{out}: {e}") from e

    # -- per-class records ----------------------------------------------------------------------
    def part(self, split: str, cls: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_text(f"{PARTS}/{split}/{cls}.json"))
        except StorageError as e:
            if e.kind == "not_found":
                return None
            raise
        except ValueError:
            return None  # unreadable: the class is redone

    def write_part(self, split: str, cls: str, files: dict[str, list]) -> None:
        part = {"format": DATASET_FORMAT, "split": split, "class": cls, "files": files}
        self.store.write_text(f"{PARTS}/{split}/{cls}.json", json.dumps(part, sort_keys=True))

    def parts(self, split: str) -> list[str]:
        return sorted(n[:-5] for n in self.store.list(f"{PARTS}/{split}") if n.endswith(".json"))

    def stored(self, split: str, cls: str) -> dict[str, int]:
        """{name: size} of the class folder as stored now."""
        return self._files(f"{split}/{cls}")

    def _files(self, folder: str) -> dict[str, int]:
        # Hidden names are the temporaries of an interrupted atomic write, never images.
        return {k: v for k, v in self.store.find(folder).items() if "/" not in k and not k.startswith(".")}

    def complete(self, split: str, cls: str) -> bool:
        part = self.part(split, cls)
        if part is None:
            return False
        return self.stored(split, cls) == {n: s for n, (s, _) in part["files"].items()}

    # -- writing ---------------------------------------------------------------------------------
    def _writing(self, split: str, cls: str) -> str:
        # Locally a class is written under .partial/ and renamed into place whole; an object store has no
        # rename, so objects go to their final place and the class record written last marks it done.
        return f"{split}/{cls}" if self.remote else f"{STAGING}/{split}/{cls}"

    def staged(self, split: str, cls: str) -> dict[str, int]:
        """What an earlier attempt already wrote for this class (for the per-file resume of val)."""
        return self._files(self._writing(split, cls))

    def begin(self, split: str, cls: str, *, fresh: bool) -> None:
        if fresh and not self.remote:
            self.store.delete(self._writing(split, cls), recursive=True)

    def write(self, split: str, cls: str, name: str, data: bytes) -> None:
        # Atomic: a file under its final name is never torn (resume trusts it); on S3 one PUT. No fsync per
        # image (1.3M of them would cost minutes to hours on a parallel filesystem): commit() checks every
        # file's size against the class record once the class is complete.
        self.store.write_bytes(f"{self._writing(split, cls)}/{name}", data, durable=False)

    def commit(self, split: str, cls: str, files: dict[str, list]) -> None:
        """Make the class visible, check it against ``files`` and record it."""
        if self.remote:
            for extra in sorted(set(self.stored(split, cls)) - set(files)):
                self.store.delete(f"{split}/{cls}/{extra}")  # left by another archive: it would be trained on
        else:
            # A complete but unrecorded class (interrupted right after the rename) is replaced.
            self.store.delete(f"{split}/{cls}", recursive=True)
            self.store.rename(self._writing(split, cls), f"{split}/{cls}")
        stored = self.stored(split, cls)
        expected = {n: s for n, (s, _) in files.items()}
        if stored != expected:
            bad = sorted(n for n in set(stored) | set(expected) if stored.get(n) != expected.get(n))
            raise DataError(
                f"{self.store.url(f'{split}/{cls}')}: after writing, {len(bad)} file(s) are missing or "
                f"have the wrong size (e.g. {bad[0]}: stored {stored.get(bad[0])} bytes, expected "
                f"{expected.get(bad[0])}); check the free space and the storage, then run again"
            )
        self.write_part(split, cls, files)


class _Writer:
    """A bounded pool of write threads: the stream never runs more than ``4 * workers`` images ahead."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prepare-write")
        self.slots = threading.Semaphore(4 * max(1, workers))
        self.futures: list[Future] = []
        self.failed: Future | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.failed is not None:
            self.failed.result()  # stop reading the archive as soon as a write has failed
        self.slots.acquire()
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        self.futures.append(fut)

    def _done(self, fut: Future) -> None:
        if fut.exception() is not None and self.failed is None:
            self.failed = fut
        self.slots.release()

    def drain(self) -> None:
        futures, self.futures = self.futures, []
        for fut in futures:
            fut.result()  # the first failed write raises here, naming its URI (StorageError) or path

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _size_of(path: str) -> int:
    with open_input(path) as (_, size):
        return size


# --------------------------------------------------------------------------------------------------
# The splits


def _prepare_train(tree: _PreparedTree, train_tar: str, writer: _Writer, *, progress: bool) -> tuple[int, int]:
    """Returns (classes written, classes skipped as already complete)."""
    bar = _progress(_size_of(train_tar), progress, "train")
    written = skipped = 0
    try:
        for cls, archived, images in iter_train_classes(train_tar):
            if tree.complete("train", cls):
                skipped += 1
                bar.update(archived)
                continue
            tree.begin("train", cls, fresh=True)
            files: dict[str, list] = {}
            for name, data in images:
                files[name] = [len(data), hashlib.sha256(data).hexdigest()]
                writer.submit(tree.write, "train", cls, name, data)
                bar.update(len(data))
            writer.drain()
            if not files:
                raise DataError(f"{train_tar}: the class archive {cls}.tar holds no images")
            tree.commit("train", cls, files)
            written += 1
    finally:
        bar.close()
    return written, skipped


def _prepare_val(
    tree: _PreparedTree, val_tar: str, labels: dict[str, str], writer: _Writer, *, progress: bool
) -> tuple[int, int]:
    classes = sorted(set(labels.values()))
    done = {c for c in classes if tree.complete("val", c)}
    if len(done) == len(classes):
        return 0, len(classes)
    todo = [c for c in classes if c not in done]
    present = {c: tree.staged("val", c) for c in todo}
    for c in todo:
        tree.begin("val", c, fresh=False)  # val images of all classes arrive interleaved: keep what is there
    files: dict[str, dict[str, list]] = {c: {} for c in todo}
    seen = 0
    bar = _progress(_size_of(val_tar), progress, "val")
    try:
        for name, data in iter_val_images(val_tar):
            cls = labels.get(name)
            if cls is None:
                raise DataError(
                    f"{val_tar} holds {name}, which the validation labels do not list: the labels "
                    f"(--devkit / --val-labels) belong to another set of images"
                )
            seen += 1
            bar.update(len(data))
            if cls in done:
                continue
            files[cls][name] = [len(data), hashlib.sha256(data).hexdigest()]
            if present[cls].get(name) != len(data):
                writer.submit(tree.write, "val", cls, name, data)
        writer.drain()
    finally:
        bar.close()
    expected = len(labels)
    if seen != expected:
        missing = sorted(set(labels) - _names_seen(files, done, labels))[:3]
        raise DataError(
            f"{val_tar} holds {seen} images but the validation labels list {expected} (missing e.g. "
            f"{', '.join(missing)}): is the archive complete?"
        )
    for c in todo:
        tree.commit("val", c, files[c])
    return len(todo), len(done)


def _names_seen(files: dict[str, dict[str, list]], done: set[str], labels: dict[str, str]) -> set[str]:
    seen = {n for per in files.values() for n in per}
    return seen | {n for n, c in labels.items() if c in done}


def _val_labels(devkit: str, val_labels: str) -> dict[str, str]:
    if devkit and val_labels:
        raise DataError(
            "give the validation labels once: --devkit ILSVRC2012_devkit_t12.tar.gz or --val-labels "
            "LOC_val_solution.csv, not both"
        )
    if devkit:
        return read_devkit(devkit)
    if val_labels:
        return read_loc_csv(val_labels)
    raise DataError(
        "--val-tar needs the validation labels: --devkit ILSVRC2012_devkit_t12.tar.gz (ground truth + "
        "meta.mat) or --val-labels LOC_val_solution.csv"
    )


# --------------------------------------------------------------------------------------------------
# Manifest


def build_dataset_manifest(tree_url: str, *, mean_image: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise every class record of the tree; raise if the splits' classes disagree."""
    tree = _PreparedTree(tree_url)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        classes = {}
        for cls in tree.parts(split):
            part = tree.part(split, cls)
            if part is None:
                continue
            classes[cls] = {
                "files": len(part["files"]),
                "bytes": sum(s for s, _ in part["files"].values()),
                "sha256": _digest(part["files"]),
            }
        if classes:
            splits[split] = {
                "classes": classes,
                "files": sum(c["files"] for c in classes.values()),
                "bytes": sum(c["bytes"] for c in classes.values()),
            }
    if "train" in splits and "val" in splits and set(splits["train"]["classes"]) != set(splits["val"]["classes"]):
        only_train = sorted(set(splits["train"]["classes"]) - set(splits["val"]["classes"]))
        only_val = sorted(set(splits["val"]["classes"]) - set(splits["train"]["classes"]))
        raise DataError(
            f"{tree_url}: the training and validation classes differ (only in train: "
            f"{', '.join(only_train[:5]) or 'none'}; only in val: {', '.join(only_val[:5]) or 'none'}): "
            f"the archives and the labels are not from the same release"
        )
    manifest: dict[str, Any] = {
        "format": DATASET_FORMAT,
        "dataset": "ILSVRC2012",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "splits": splits,
    }
    if mean_image:
        manifest["mean_image"] = mean_image
    return manifest


def read_dataset_manifest(tree_url: str) -> dict[str, Any]:
    try:
        return json.loads(Storage(tree_url).read_text(DATASET_MANIFEST))
    except StorageError as e:
        if e.kind == "not_found":
            raise DataError(
                f"{tree_url} has no {DATASET_MANIFEST}: it was not written by pipeline.tools.prepare, or "
                f"the preparation did not finish (run the same prepare command again to resume)"
            ) from e
        raise DataError(f"cannot read {tree_url}/{DATASET_MANIFEST}: {e}") from e
    except ValueError as e:
        raise DataError(
            f"{tree_url}/{DATASET_MANIFEST} is not valid JSON ({e}); run prepare again to rewrite it"
        ) from e


def verify_tree(tree_url: str, *, workers: int = 8, progress: bool = True) -> list[str]:
    """Re-check a prepared tree against its manifest: every class record, every file's presence, size
    and sha256. Returns the problems found, each naming the file; [] when the tree is intact."""
    tree = _PreparedTree(tree_url)
    manifest = read_dataset_manifest(tree_url)
    problems: list[str] = []
    to_hash: list[tuple[str, str, int, str]] = []  # (split, rel, size, sha256)
    for split, info in manifest.get("splits", {}).items():
        for cls, summary in info["classes"].items():
            part = tree.part(split, cls)
            where = tree.store.url(f"{split}/{cls}")
            if part is None:
                problems.append(f"{where}: its record {PARTS}/{split}/{cls}.json is missing or unreadable")
                continue
            if _digest(part["files"]) != summary["sha256"]:
                problems.append(f"{where}: its record {PARTS}/{split}/{cls}.json does not match {DATASET_MANIFEST}")
            stored = tree.stored(split, cls)
            for name, (size, sha) in sorted(part["files"].items()):
                rel = f"{split}/{cls}/{name}"
                if name not in stored:
                    problems.append(f"{tree.store.url(rel)}: missing")
                elif stored[name] != size:
                    problems.append(f"{tree.store.url(rel)}: {stored[name]} bytes, the manifest says {size}")
                else:
                    to_hash.append((split, rel, size, sha))
            for extra in sorted(set(stored) - set(part["files"])):
                problems.append(
                    f"{tree.store.url(f'{split}/{cls}/{extra}')}: not in the manifest (it would be trained on)"
                )
    bar = _progress(sum(s for _, _, s, _ in to_hash), progress, "verify")

    def check(item: tuple[str, str, int, str]) -> str | None:
        _, rel, size, sha = item
        h = hashlib.sha256()
        with tree.store.open(rel) as f:
            while block := f.read(1 << 20):
                h.update(block)
        bar.update(size)
        return None if h.hexdigest() == sha else f"{tree.store.url(rel)}: sha256 differs from the manifest"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems += [p for p in pool.map(check, to_hash) if p]
    bar.close()
    return problems


# --------------------------------------------------------------------------------------------------
# Mean image


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
    from PIL import Image

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
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), unit="img", desc="mean image", dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for arr in pool.map(load, chosen):
            total += arr
            if bar is not None:
                bar.update(1)
    if bar is not None:
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


# --------------------------------------------------------------------------------------------------
# Sharded splits


def _tar_member_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512  # a header block, then the data padded to whole blocks


def _tar_bytes(members: int) -> int:
    # Two zero blocks end the archive, and Python's tarfile pads it to whole 10 KiB records.
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_shards(sizes: list[int], *, shard_bytes: int) -> list[list[int]]:
    """Cut samples (their image sizes, in shard order) into runs whose tar stays within ``shard_bytes`` (a
    sample larger than that gets a shard of its own); returns the positions of each shard's samples."""
    shards: list[list[int]] = [[]]
    used = 0
    for pos, size in enumerate(sizes):
        need = _tar_member_bytes(size) + _tar_member_bytes(4)  # the .jpg and its .cls (a few digits)
        if shards[-1] and _tar_bytes(used + need) > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(pos)
        used += need
    return shards if shards[0] else []


def _sample_key(number: int, rel: str) -> str:
    """Unique in the split (the shuffled position) and traceable to the source image (its name); no "." or "/"."""
    stem = posixpath.splitext(posixpath.basename(rel))[0]
    return f"{number:09d}_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)


def write_sharded_split(
    split_path: str,
    out: str,
    *,
    shard_bytes: int = shard_format.DEFAULT_SHARD_BYTES,
    seed: int = 0,
    workers: int = 8,
    progress: bool = True,
) -> shard_format.ShardManifest:
    """Write the ImageFolder split at ``split_path`` (local or s3://) as shards in ``out`` (local or s3://);
    returns the manifest, which is written last (a folder with a manifest is complete)."""
    if shard_bytes < 4096:
        raise DataError(f"--shard-bytes {shard_bytes} is too small for a tar shard; use e.g. 268435456 (256 MB)")
    index = scan_split(split_path)
    source = Storage(split_path)
    cut = len(split_path.rstrip("/")) + 1
    rels = [f[cut:].replace(os.sep, "/") for f in index.files]  # scan_split joins files onto split_path as given
    listed = source.find()  # one listing; a file it misses (below a symlinked folder) is asked for alone
    sizes = {r: listed[r] if r in listed else source.size(r) for r in rels}
    order = np.random.default_rng(seed).permutation(len(rels)).tolist()  # shuffled once: shards are class-mixed
    plan = plan_shards([sizes[rels[i]] for i in order], shard_bytes=shard_bytes)
    dest = Storage(out)
    try:
        dest.check_access(write=True)
        dest.delete(shard_format.MANIFEST)  # until the new manifest is written, the folder is not a complete split
    except StorageError as e:
        raise DataError(f"cannot write the shards to {out}: {e}") from e
    bar = _progress(sum(sizes[r] for r in rels), progress, posixpath.basename(split_path.rstrip("/")))
    infos: list[shard_format.ShardInfo] = []
    with tempfile.TemporaryDirectory(prefix="shards-") as scratch, ThreadPoolExecutor(max(1, workers)) as pool:
        # Locally a shard is written in place (write_shard renames it into place whole); for S3 it is written
        # to scratch space and uploaded, then checked against its local sha256.
        folder = scratch if dest.remote else dest.root
        for number, positions in enumerate(plan):
            picked = [order[p] for p in positions]

            def samples(picked: list[int] = picked, first: int = positions[0]):
                read = pool.map(source.read_bytes, [rels[i] for i in picked])
                for k, (i, data) in enumerate(zip(picked, read, strict=True)):
                    bar.update(len(data))
                    yield _sample_key(first + k, rels[i]), data, index.labels[i]

            name = shard_format.shard_name(number)
            info = shard_format.write_shard(os.path.join(folder, name), samples())
            if dest.remote:
                for file, sha in ((info.name, info.sha256), (info.index, info.index_sha256)):
                    stored = dest.put(os.path.join(folder, file), file)
                    os.unlink(os.path.join(folder, file))
                    if stored.sha256 != sha:
                        raise DataError(f"{dest.url(file)}: uploaded copy differs from the shard written; run again")
            infos.append(info)
    bar.close()
    # Shards beyond this plan are from an earlier run of the split with other settings: not part of it.
    keep = {n for i in infos for n in (i.name, i.index)}
    for name in dest.list():
        if name.startswith("shard-") and name not in keep:
            dest.delete(name)
    manifest = shard_format.ShardManifest(num_classes=len(index.classes), shards=infos, classes=list(index.classes))
    shard_format.write_manifest(dest, manifest)
    return manifest


def _split_folders(root: str) -> list[str]:
    """The split folders (train, val, test, ...) of an ImageFolder tree: sub-folders holding class folders."""
    store = Storage(root)
    try:
        names = [n for n in store.list_dirs() if not n.startswith(".")]
    except StorageError as e:
        raise DataError(f"cannot list {root}: {e}") from e
    splits = [n for n in names if list_classes(store.url(n))]
    if not splits:
        raise DataError(
            f"{root} holds no split folders ({root}/<split>/<class>/<image>, e.g. train/ and val/); give the "
            f"root of an ImageFolder tree"
        )
    return splits


def prepare_shards(
    root: str,
    out: str,
    *,
    splits: list[str] | None = None,
    shard_bytes: int = shard_format.DEFAULT_SHARD_BYTES,
    seed: int = 0,
    workers: int = 8,
    progress: bool = True,
) -> dict[str, shard_format.ShardManifest]:
    """Every split of the ImageFolder tree ``root`` (or those named) as sharded splits ``out/<split>/``."""
    splits = splits or _split_folders(root)
    src, dst = Storage(root), Storage(out)
    done = {}
    for split in splits:
        done[split] = write_sharded_split(
            src.url(split), dst.url(split), shard_bytes=shard_bytes, seed=seed, workers=workers, progress=progress
        )
    return done


# --------------------------------------------------------------------------------------------------
# The command


def prepare_imagenet(
    out: str,
    *,
    train_tar: str = "",
    val_tar: str = "",
    devkit: str = "",
    val_labels: str = "",
    workers: int = 8,
    mean_samples: int = 10000,
    image_size: int = 224,
    resize: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish writing) the ImageFolder tree at ``out`` from the archives; returns the manifest."""
    if not (train_tar or val_tar):
        raise DataError("nothing to prepare: give --train-tar and/or --val-tar (or --verify to check an existing tree)")
    labels = _val_labels(devkit, val_labels) if val_tar else None  # bad labels fail before any writing
    tree = _PreparedTree(out, write=True)
    writer = _Writer(workers)
    report = []
    train_written = 0
    try:
        if train_tar:
            train_written, skipped = _prepare_train(tree, train_tar, writer, progress=progress)
            report.append(f"train: {train_written} classes written, {skipped} already complete")
        if val_tar:
            assert labels is not None
            written, skipped = _prepare_val(tree, val_tar, labels, writer, progress=progress)
            report.append(f"val: {written} classes written, {skipped} already complete")
    finally:
        writer.close()
    tree.store.delete(STAGING, recursive=True)
    previous = _previous_mean(tree.url)
    mean_info = previous
    stale = previous is None or (previous.get("size"), previous.get("resize")) != (image_size, resize)
    if mean_samples > 0 and train_tar and (stale or train_written):
        mean_info = write_mean_image(
            tree.url, size=image_size, resize=resize, samples=mean_samples, workers=workers, progress=progress
        )
    manifest = build_dataset_manifest(tree.url, mean_image=mean_info)
    tree.store.write_text(DATASET_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    for line in report:
        print(line, file=sys.stderr)
    return manifest


def _write_shards(args: argparse.Namespace, root: str, out: str, splits: list[str] | None) -> None:
    written = prepare_shards(
        root,
        out,
        splits=splits,
        shard_bytes=args.shard_bytes,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    for split, manifest in written.items():
        info = shard_format.describe(manifest)
        print(
            f"{Storage(out).url(split)}: {info['samples']} samples of {info['classes']} classes in {info['shards']} "
            f"shards; train with --data.format=shards --data.root={out}"
        )


def _previous_mean(tree_url: str) -> dict[str, Any] | None:
    try:
        return read_dataset_manifest(tree_url).get("mean_image")
    except DataError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.tools.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    im = sub.add_parser("imagenet", help="ILSVRC-2012 archives -> ImageFolder tree (or --verify a tree)")
    im.add_argument("--out", required=True, help="tree root: a local folder or s3://bucket/prefix")
    im.add_argument("--train-tar", default="", help="ILSVRC2012_img_train.tar (path or URL)")
    im.add_argument("--val-tar", default="", help="ILSVRC2012_img_val.tar (path or URL)")
    im.add_argument("--devkit", default="", help="ILSVRC2012_devkit_t12.tar.gz: validation labels")
    im.add_argument("--val-labels", default="", help="LOC_val_solution.csv: validation labels (instead of --devkit)")
    im.add_argument("--workers", type=int, default=8, help="parallel writes (default 8; more for S3)")
    im.add_argument(
        "--mean-samples",
        type=int,
        default=10000,
        help="training images averaged into mean_image.npy (default 10000; 0 skips it)",
    )
    im.add_argument("--verify", action="store_true", help="re-read every file and check it against the manifest")
    im.add_argument("--no-progress", action="store_true")
    im.add_argument(
        "--format",
        choices=("folder", "shards"),
        default="folder",
        help="shards: after the tree at --out, write its splits as shards to --shards-out (see `shards`)",
    )
    im.add_argument("--shards-out", default="", help="--format shards: where the sharded splits go (local or s3://)")
    sh = sub.add_parser("shards", help="ImageFolder tree -> WebDataset tar shards + DALI indexes + manifest per split")
    sh.add_argument("root", help="ImageFolder tree: ROOT/<split>/<class>/<image> (local or s3://)")
    sh.add_argument("out", help="OUT/<split>/shard-NNNNNN.{tar,idx} + manifest.json (local or s3://)")
    sh.add_argument("--splits", default="", help="comma-separated split folders (default: every one under ROOT)")
    sh.add_argument("--no-progress", action="store_true")
    for parser in (im, sh):
        parser.add_argument(
            "--shard-bytes",
            type=int,
            default=shard_format.DEFAULT_SHARD_BYTES,
            help=f"target tar size (default {shard_format.DEFAULT_SHARD_BYTES >> 20} MB)",
        )
        parser.add_argument("--seed", type=int, default=0, help="the once-only shuffle of the samples into shards")
    sh.add_argument("--workers", type=int, default=8, help="parallel reads of the source images (default 8)")
    mi = sub.add_parser("mean-image", help="(re)compute ROOT/mean_image.npy from the training split")
    mi.add_argument("root")
    mi.add_argument("--size", type=int, default=224, help="crop size = data.image_size (default 224)")
    mi.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop (default 256)")
    mi.add_argument("--samples", type=int, default=10000)
    mi.add_argument("--workers", type=int, default=8)
    mi.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.command == "imagenet" and args.format == "shards" and not args.shards_out:
        p.error("--format shards needs --shards-out (a local folder or s3://bucket/prefix for the shards)")
    try:
        if args.command == "shards":
            splits = [s for s in args.splits.split(",") if s] or None
            _write_shards(args, args.root, args.out, splits)
            return 0
        if args.command == "mean-image":
            info = write_mean_image(
                args.root,
                size=args.size,
                resize=args.resize,
                samples=args.samples,
                workers=args.workers,
                progress=not args.no_progress,
            )
            try:
                manifest = read_dataset_manifest(args.root)
                manifest["mean_image"] = info
                Storage(args.root).write_text(DATASET_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            except DataError:
                pass  # a tree not written by prepare: the .npy alone is what training reads
            print(
                f"wrote {args.root.rstrip('/')}/{MEAN_IMAGE} from {info['samples']} images "
                f"(per-channel mean {info['channel_mean']}); use --data.mean_image={MEAN_IMAGE}"
            )
            return 0
        if args.train_tar or args.val_tar:
            manifest = prepare_imagenet(
                args.out,
                train_tar=args.train_tar,
                val_tar=args.val_tar,
                devkit=args.devkit,
                val_labels=args.val_labels,
                workers=args.workers,
                mean_samples=args.mean_samples,
                progress=not args.no_progress,
            )
            for split, info in manifest["splits"].items():
                print(
                    f"{split}: {info['files']} images in {len(info['classes'])} classes, "
                    f"{info['bytes'] / 2**30:.2f} GiB"
                )
        elif not args.verify and args.format != "shards":
            p.error(
                "give --train-tar and/or --val-tar to prepare, --verify to check an existing tree, or --format shards "
                "to shard it"
            )
        if args.verify:
            problems = verify_tree(args.out, workers=args.workers, progress=not args.no_progress)
            for line in problems:
                print(f"BAD {line}")
            if problems:
                print(
                    f"{args.out}: {len(problems)} problem(s); run the prepare command again to rewrite the "
                    f"classes concerned (delete their {PARTS}/<split>/<class>.json first)",
                    file=sys.stderr,
                )
                return 1
            print(f"{args.out}: every file matches {DATASET_MANIFEST}")
        if args.format == "shards":
            _write_shards(args, args.out, args.shards_out, None)
    except (DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
