"""Find the images of a dataset tree that DALI cannot decode, or that are not what their name says.

    python -m pipeline.tools.validate /datasets/imagenet --write-list /datasets/imagenet-bad.txt
    python -m pipeline.tools.validate s3://bucket/imagenet --write-list bad.txt --convert-to s3://bucket/imagenet-fixed
    torchrun ... pipeline/train.py --config ... --data.exclude_list=/datasets/imagenet-bad.txt

Every image the loader would read (``*.jpg``, ``*.jpeg``, ``*.png`` below the root, hidden folders
aside) is read once and checked:

* ``empty``: zero bytes. DALI stops the training on it.
* ``not-an-image``: the bytes are no image format at all. DALI stops on it.
* ``corrupt``: DALI's own CPU decoder (the one training uses) fails on it, e.g. a truncated JPEG.
* ``wrong-format``: a different format than the name says (ImageNet has a PNG named ``.JPEG``).
  DALI decodes by content, so this trains, but other tools may not.
* ``cmyk``: CMYK JPEG (ImageNet has 22). DALI decodes it; colours may differ from an RGB conversion.
* ``grayscale``: one channel; DALI replicates it to RGB. Reported for information.

The first three are errors (exit status 1). ``--write-list`` writes an exclude list for
``data.exclude_list``: the errors are skipped; with ``--convert-to DIR`` the warnings are re-encoded
as RGB JPEGs under DIR and the list points training at those copies (``--strict`` skips them instead).
List format: one path relative to the root per line, optionally ``<TAB>replacement``; ``#`` comments.

A sharded dataset (``python -m pipeline.tools.prepare shards``: a split folder with a shard manifest, or a
root whose split folders have one) is checked against its manifest instead, one line per bad shard URI:
the tar and its DALI index present, their sizes and sha256, the index naming as many samples as the
manifest, and the samples counted from the tar's own headers (every key with its .jpg and .cls).

    python -m pipeline.tools.validate s3://bucket/imagenet-shards          # exit status 1 names each bad shard
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from PIL import Image, ImageFile

from pipeline.core.storage import Storage, StorageError
from pipeline.data import shard_format
from pipeline.data.errors import DataError
from pipeline.data.folder import IMAGE_EXTENSIONS, is_image, is_url
from pipeline.data.sniff import sniff
from pipeline.tools.progress import progress_bar

ERRORS = ("empty", "not-an-image", "corrupt")  # DALI stops on these
WARNINGS = ("wrong-format", "cmyk", "grayscale")  # DALI decodes these
_EXPECTED = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
_BATCH = 64  # images per DALI decode call; a failing batch is decoded image by image to find the culprit


@dataclass(frozen=True)
class Problem:
    path: str  # relative to the validated root, "/"-separated
    kind: str  # one of ERRORS or WARNINGS
    detail: str

    @property
    def is_error(self) -> bool:
        return self.kind in ERRORS


# --------------------------------------------------------------------------------------------------
# The full check


def _image_tree(root: str) -> Storage:
    """The dataset tree at ``root``; a local root is made absolute, so that messages name every file fully."""
    if is_url(root):
        return Storage(root)
    return Storage(os.path.abspath(root.removeprefix("file://")))


def _images(tree: Storage) -> list[str]:
    """Every image the loader would read below ``tree`` (hidden folders aside), "/"-separated, in walk order."""
    try:
        if not tree.is_dir():
            raise DataError(
                f"{tree.uri} does not exist or is not a folder; give the dataset root (holding "
                f"train/ and val/) or one split folder"
            )
        walked = tree.walk(skip_hidden=True)
    except StorageError as e:
        raise DataError(f"cannot list {tree.uri}: {e}") from e
    return [f"{folder}/{name}" if folder else name for folder, _, names in walked for name in names if is_image(name)]


def _inspect(rel: str, data: bytes) -> Problem | None:
    """Checks that need no decoding: size, format against the name, colour mode."""
    if not data:
        return Problem(rel, "empty", "0 bytes")
    fmt = sniff(data[:16])
    if fmt is None:
        return Problem(rel, "not-an-image", f"{len(data)} bytes starting with {data[:8]!r}")
    ext = os.path.splitext(rel)[1].lower()
    if _EXPECTED.get(ext, fmt) != fmt:
        return Problem(rel, "wrong-format", f"{fmt.upper()} data named {ext}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
    except Exception:  # noqa: BLE001 - the decoder check below reports the reason
        return None
    if mode == "CMYK":
        return Problem(rel, "cmyk", "CMYK JPEG")
    if mode in ("L", "LA", "1", "I", "I;16", "F"):
        return Problem(rel, "grayscale", f"one channel (mode {mode})")
    return None


def _pil_reason(data: bytes) -> str:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any failure is the reason we want
        return str(e) or type(e).__name__
    return ""


class _Decoder:
    """DALI's CPU image decoder in dynamic mode (the decoder training uses), or PIL without DALI."""

    def __init__(self) -> None:
        try:
            # Optional here: without DALI (a stripped install) the check falls back to PIL.
            import nvidia.dali.experimental.dynamic as ndd  # noqa: F401

            self.ndd = ndd
        except ImportError:  # pragma: no cover - DALI is a dependency; a stripped install falls back
            self.ndd = None

    def failures(self, items: list[tuple[str, bytes]]) -> dict[str, str]:
        """{rel: reason} for every image of ``items`` the decoder rejects."""
        if not items:
            return {}
        if self.ndd is None:
            return {rel: why for rel, data in items if (why := _pil_reason(data))}
        ndd = self.ndd
        try:
            out = ndd.decoders.image(ndd.as_batch([np.frombuffer(d, np.uint8) for _, d in items]), device="cpu")
            out.evaluate()
            return {}
        except Exception:  # noqa: BLE001 - find the culprit(s) image by image
            pass
        bad = {}
        for rel, data in items:
            try:
                ndd.decoders.image(ndd.as_tensor(np.frombuffer(data, np.uint8)), device="cpu").evaluate()
            except Exception as e:  # noqa: BLE001
                why = _pil_reason(data) or " ".join(str(e).split())[:200]
                bad[rel] = why
        return bad


def validate_tree(root: str, *, workers: int = 8, progress: bool = True) -> tuple[list[Problem], int]:
    """Check every image below ``root``; returns (problems sorted by path, number of images checked)."""
    tree = _image_tree(root)
    images = _images(tree)
    if not images:
        raise DataError(
            f"{tree.uri} holds no images ({'/'.join(IMAGE_EXTENSIONS)}); give the dataset root or a split folder"
        )
    decoder = _Decoder()
    problems: list[Problem] = []
    bar = progress_bar(len(images), enabled=progress, desc="validate")

    def load(rel: str) -> tuple[str, bytes | None, str]:
        try:
            return rel, tree.read_bytes(rel), ""
        except Exception as e:  # noqa: BLE001 - an unreadable file is a finding, not a crash
            return rel, None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in _chunks(images, _BATCH):
            to_decode = []
            for rel, data, err in pool.map(load, chunk):
                if data is None:
                    problems.append(Problem(rel, "corrupt", f"cannot be read: {err}"))
                    continue
                found = _inspect(rel, data)
                if found is not None:
                    problems.append(found)
                if found is None or not found.is_error:
                    to_decode.append((rel, data))
            warned = {p.path for p in problems}
            for rel, why in decoder.failures(to_decode).items():
                if rel in warned:  # a decode failure outranks a format warning
                    problems[:] = [p for p in problems if p.path != rel]
                problems.append(Problem(rel, "corrupt", why or "DALI cannot decode it"))
            bar.update(len(chunk))
    bar.close()
    return sorted(problems, key=lambda p: p.path), len(images)


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --------------------------------------------------------------------------------------------------
# Sharded datasets


def sharded_splits(root: str) -> list[Storage]:
    """The sharded split folders at ``root``: itself when it holds a shard manifest, else its sub-folders that
    do; [] for anything else (an ImageFolder tree's own manifest.json is not a shard manifest)."""
    tree = _image_tree(root)

    def holds_shards(store: Storage) -> bool:
        try:
            return json.loads(store.read_text(shard_format.MANIFEST)).get("format") == shard_format.FORMAT
        except (StorageError, ValueError, UnicodeDecodeError, AttributeError):
            return False

    if holds_shards(tree):
        return [tree]
    try:
        folders = [n for n in tree.list_dirs() if not n.startswith(".")]
    except StorageError as e:
        raise DataError(f"cannot list {tree.uri}: {e}") from e
    return [tree.child(n) for n in folders if holds_shards(tree.child(n))]


class _Hashing:
    """A read-only stream that hashes and counts what is read through it (one pass: sha256 and tar headers)."""

    def __init__(self, f: io.BufferedIOBase) -> None:
        self.f, self.sha, self.read_bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.read_bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _tar_samples(stream: _Hashing, *, num_classes: int) -> tuple[int, str]:
    """(samples, problem) from the tar's headers: a sample is a key with exactly a .jpg and a .cls member whose
    class index is below ``num_classes``; "" when every member is in order."""
    members: dict[str, set[str]] = {}
    bad_label = ""
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            members.setdefault(key, set()).add(ext)
            if ext == "cls":
                f = tar.extractfile(m)
                text = f.read().decode(errors="replace") if f else ""
                if not text.strip().isdigit() or int(text) >= num_classes:
                    bad_label = bad_label or f"{m.name} holds {text[:20]!r}, not a class index below {num_classes}"
    stream.drain()  # the end-of-archive padding, for the sha256
    incomplete = sorted(k for k, exts in members.items() if exts != set(shard_format.EXTENSIONS))
    if incomplete:
        return len(members), f"sample {incomplete[0]} has {sorted(members[incomplete[0]])}, not one .jpg and one .cls"
    return len(members), bad_label


def check_shard(split: Storage, shard: shard_format.ShardInfo, *, num_classes: int) -> list[str]:
    """What is wrong with one shard of ``split`` against its manifest entry; each line starts with its URI."""
    uri, problems = split.url(shard.name), []
    try:
        size = split.size(shard.name)
    except StorageError as e:
        return [f"{uri}: missing or unreadable ({e})"]
    if size != shard.bytes:
        problems.append(f"{uri}: {size} bytes, the manifest says {shard.bytes} (truncated or rewritten)")
    try:
        with split.open(shard.name) as f:
            stream = _Hashing(f)
            try:
                samples, bad = _tar_samples(stream, num_classes=num_classes)
            except (tarfile.TarError, EOFError, OSError) as e:
                stream.drain()
                samples, bad = -1, f"not a readable tar ({type(e).__name__}: {e})"
    except StorageError as e:
        return [*problems, f"{uri}: cannot be read ({e})"]
    if stream.sha.hexdigest() != shard.sha256:
        problems.append(f"{uri}: sha256 differs from the manifest (corrupt)")
    if bad:
        problems.append(f"{uri}: {bad}")
    if samples >= 0 and samples != shard.samples:
        problems.append(f"{uri}: its tar headers hold {samples} samples, the manifest says {shard.samples}")
    index_uri = split.url(shard.index)
    try:
        index = split.read_bytes(shard.index)
    except StorageError as e:
        return [*problems, f"{uri}: its DALI index {index_uri} is missing or unreadable ({e})"]
    if hashlib.sha256(index).hexdigest() != shard.index_sha256:
        problems.append(f"{uri}: its DALI index {index_uri} differs from the manifest's sha256")
    try:
        lines = shard_format.parse_index(index.decode(errors="replace"), uri=index_uri)
        if len(lines) != shard.samples:
            problems.append(f"{uri}: its DALI index lists {len(lines)} samples, the manifest says {shard.samples}")
    except DataError as e:
        problems.append(f"{uri}: {e}")
    return problems


def validate_shards(root: str, *, workers: int = 8, progress: bool = True) -> tuple[list[str], int]:
    """Check every sharded split at ``root`` against its manifest; returns (problems, each naming its shard
    URI, and the number of shards checked). Raises DataError when ``root`` holds no shard manifest."""
    splits = sharded_splits(root)
    if not splits:
        raise DataError(f"{root} holds no shard manifest ({shard_format.MANIFEST} of a sharded split)")
    jobs = []
    for split in splits:
        manifest = shard_format.read_manifest(split)
        jobs += [(split, s, manifest.num_classes) for s in manifest.shards]
    bar = progress_bar(len(jobs), enabled=progress, desc="shards")

    def check(job: tuple[Storage, shard_format.ShardInfo, int]) -> list[str]:
        found = check_shard(job[0], job[1], num_classes=job[2])
        bar.update(1)
        return found

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = [p for found in pool.map(check, jobs) for p in found]
    bar.close()
    return problems, len(jobs)


# --------------------------------------------------------------------------------------------------
# Outputs


def convert_to_rgb_jpeg(data: bytes, *, quality: int = 95) -> bytes:
    """Re-encode any image PIL reads as a baseline RGB JPEG."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_list(
    problems: Iterable[Problem], *, root: str, list_path: str, convert_to: str = "", strict: bool = False
) -> tuple[int, int]:
    """Write the exclude list (and converted copies); returns (skipped, replaced) counts."""
    tree = _image_tree(root)
    out_store = Storage(convert_to) if convert_to else None
    lines = [
        f"# written by `python -m pipeline.tools.validate {tree.uri}` on "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}",
        "# <path relative to the root>[<TAB><converted copy>]; use it as --data.exclude_list",
    ]
    skipped = replaced = 0
    for p in problems:
        if not p.is_error and not convert_to and not strict:
            continue
        if not p.is_error and out_store is not None and not strict:
            out_store.write_bytes(p.path, convert_to_rgb_jpeg(tree.read_bytes(p.path)))
            lines += [f"# {p.kind}: {p.detail}; converted to RGB JPEG", f"{p.path}\t{out_store.url(p.path)}"]
            replaced += 1
            continue
        lines += [f"# {p.kind}: {p.detail}", p.path]
        skipped += 1
    folder, name = Storage.of_file(list_path)
    folder.write_text(name, "\n".join(lines) + "\n")
    return skipped, replaced


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.tools.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="dataset root or split folder: a local path or s3://bucket/prefix")
    p.add_argument("--write-list", metavar="LIST", default="", help="write an exclude list for data.exclude_list")
    p.add_argument(
        "--convert-to",
        metavar="DIR",
        default="",
        help="re-encode the warnings (wrong format, CMYK, grayscale) as RGB JPEGs here, and list them",
    )
    p.add_argument("--strict", action="store_true", help="list the warnings as skipped too (no conversion)")
    p.add_argument("--workers", type=int, default=8, help="parallel reads (default 8)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.convert_to and not args.write_list:
        p.error("--convert-to needs --write-list: training finds the converted copies through the list")
    try:
        if sharded_splits(args.root):
            if args.write_list:
                p.error("--write-list is for ImageFolder trees; a sharded dataset is re-made with prepare shards")
            bad, shards = validate_shards(args.root, workers=args.workers, progress=not args.no_progress)
            for line in bad:
                print(f"BAD {line}")
            print(f"checked {shards} shards under {args.root}: {len(bad)} problem(s)")
            if bad:
                print(
                    "re-create the dataset with `python -m pipeline.tools.prepare shards SRC_ROOT OUT_ROOT` "
                    "(or copy the named shards again from a good copy)",
                    file=sys.stderr,
                )
            return 1 if bad else 0
        problems, total = validate_tree(args.root, workers=args.workers, progress=not args.no_progress)
        for prob in problems:
            print(
                f"{'ERROR' if prob.is_error else 'warning'} {prob.kind}: {_image_tree(args.root).url(prob.path)}: "
                f"{prob.detail}"
            )
        errors = sum(prob.is_error for prob in problems)
        print(f"checked {total} images under {args.root}: {errors} error(s), {len(problems) - errors} warning(s)")
        if args.write_list:
            skipped, replaced = write_list(
                problems, root=args.root, list_path=args.write_list, convert_to=args.convert_to, strict=args.strict
            )
            print(
                f"wrote {args.write_list}: {skipped} skipped, {replaced} replaced; train with "
                f"--data.exclude_list={args.write_list}"
            )
    except (DataError, StorageError, OSError) as e:  # storage errors carry their own explanation
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
