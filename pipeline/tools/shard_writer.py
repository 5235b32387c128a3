"""An ImageFolder tree's splits as sharded splits (``python -m pipeline.tools.prepare shards``, or ``imagenet
--format shards``), in the layout of :mod:`pipeline.data.shard_format`; the help text of :mod:`pipeline.tools.prepare`
describes the result. The samples are shuffled once (``seed``) and cut into shards of about ``shard_bytes``
(:func:`plan_shards`); the split's manifest is written last.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.core.storage import Storage, StorageError
from pipeline.data import shard_format
from pipeline.data.errors import DataError
from pipeline.data.folder import list_classes, scan_split
from pipeline.tools.progress import progress_bar


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
    bar = progress_bar(
        sum(sizes[r] for r in rels), enabled=progress, desc=posixpath.basename(split_path.rstrip("/")), unit="B"
    )
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
