"""The ILSVRC-2012 distribution: its archives and its validation labels, read as streams.

* ``ILSVRC2012_img_train.tar``: a tar of 1,000 tars, ``nXXXXXXXX.tar``, each holding one class's
  ``nXXXXXXXX_NNNN.JPEG`` images.
* ``ILSVRC2012_img_val.tar``: 50,000 images ``ILSVRC2012_val_NNNNNNNN.JPEG`` with no labels.
* Labels of the validation images, either from the devkit (``ILSVRC2012_devkit_t12.tar.gz``:
  ``data/ILSVRC2012_validation_ground_truth.txt`` lists the 1-based ILSVRC2012_ID of image 1, 2, ...
  and ``data/meta.mat`` maps ILSVRC2012_ID to WNID) or from a ``LOC_val_solution.csv``-style file
  (``ImageId,PredictionString``, the first token of PredictionString being the WNID).

Archives are read with ``tarfile`` in stream mode (``r|``): one sequential pass, one image in memory
at a time, from a local file or an object-store URL (through :mod:`pipeline.core.storage`). Used by
:mod:`pipeline.tools.imagenet_tree`.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import numpy as np

from pipeline.core.storage import Storage, StorageError
from pipeline.data.errors import DataError

WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
_READ = 1 << 20  # tarfile's read size on the stream: few, large reads suit object storage
# What a truncated or corrupted archive raises while streaming (not I/O errors of the storage itself).
_BROKEN = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_T = TypeVar("_T")


@contextlib.contextmanager
def open_input(path: str) -> Iterator[tuple[IO[bytes], int]]:
    """A binary stream over a local file or URL, and its size in bytes (for progress)."""
    store, name = Storage.of_file(path)
    try:
        size = store.size(name)
    except StorageError as e:
        if e.kind == "not_found":
            raise DataError(f"{path} does not exist (or is not a file); give the path or URL of the archive") from e
        raise DataError(f"cannot read {path}: {e}") from e
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(store.open(name))
        try:
            yield f, size
        finally:
            # Closed without the caller's exception: Storage.open would turn a damaged archive's TarError (or a
            # DataError of the caller) into a StorageError about opening the file.
            stack.close()


def _damaged(path: str, e: BaseException) -> DataError:
    return DataError(
        f"{path} is damaged or ends early ({type(e).__name__}: {e}); compare its size and checksum with "
        f"the official archive, replace it and run the same command again: finished classes are kept"
    )


# --------------------------------------------------------------------------------------------------
# Validation labels


def read_devkit(path: str) -> dict[str, str]:
    """{validation image name: WNID} from the ILSVRC-2012 devkit archive."""
    wanted = {GROUND_TRUTH: None, META: None}
    try:
        with open_input(path) as (f, _), tarfile.open(fileobj=f, mode="r|*", bufsize=_READ) as tar:
            for member in tar:
                name = posixpath.basename(member.name)
                if member.isfile() and name in wanted:
                    wanted[name] = tar.extractfile(member).read()  # both are small (< 3 MB)
    except _BROKEN as e:
        raise _damaged(path, e) from e
    missing = [n for n, data in wanted.items() if data is None]
    if missing:
        raise DataError(
            f"{path} has no {' or '.join('data/' + m for m in missing)}: it is not the ILSVRC-2012 devkit "
            f"(ILSVRC2012_devkit_t12.tar.gz); give that archive with --devkit, or a LOC_val_solution.csv "
            f"with --val-labels"
        )
    id_to_wnid = parse_meta(wanted[META], source=f"{path}:data/{META}")
    return parse_ground_truth(
        wanted[GROUND_TRUTH].decode("ascii", "replace"), id_to_wnid, source=f"{path}:data/{GROUND_TRUTH}"
    )


def parse_meta(data: bytes, *, source: str) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of the 1,000 leaf classes in the devkit's ``meta.mat``."""
    import scipy.io  # heavy (up to a second to import) and needed only for the devkit's labels: imported when they are read

    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
    except Exception as e:  # noqa: BLE001 - scipy raises several types for a bad file
        raise DataError(f"{source} is not a MATLAB file scipy can read ({e})") from e
    synsets = mat.get("synsets")
    fields = synsets.dtype.names if synsets is not None and synsets.dtype.names else ()
    if synsets is None or "ILSVRC2012_ID" not in fields or "WNID" not in fields:
        raise DataError(
            f"{source} has no 'synsets' struct array with ILSVRC2012_ID and WNID fields "
            f"(found {sorted(k for k in mat if not k.startswith('__'))}); is it the ILSVRC-2012 devkit?"
        )
    out: dict[int, str] = {}
    for rec in np.atleast_1d(synsets):
        if "num_children" in fields and int(rec["num_children"]) != 0:
            continue  # an inner node of the WordNet hierarchy, not a class
        ident, wnid = int(rec["ILSVRC2012_ID"]), str(rec["WNID"])
        if not WNID.match(wnid):
            raise DataError(f"{source}: synset {ident} has WNID {wnid!r}, not of the form nXXXXXXXX")
        out[ident] = wnid
    if not out:
        raise DataError(f"{source} lists no leaf synsets (num_children = 0)")
    return out


def parse_ground_truth(text: str, id_to_wnid: dict[int, str], *, source: str) -> dict[str, str]:
    """Line i (1-based) holds the ILSVRC2012_ID of ``ILSVRC2012_val_<i:08d>.JPEG``."""
    out: dict[str, str] = {}
    for i, line in enumerate(text.split(), 1):
        try:
            wnid = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise DataError(
                f"{source}, line {i}: {line!r} is not an ILSVRC2012_ID of meta.mat's {len(id_to_wnid)} classes"
            ) from None
        out[f"ILSVRC2012_val_{i:08d}.JPEG"] = wnid
    if not out:
        raise DataError(f"{source} is empty")
    return out


def read_loc_csv(path: str) -> dict[str, str]:
    """{validation image name: WNID} from a ``LOC_val_solution.csv``-style file."""
    with open_input(path) as (f, _):
        text = f.read().decode("utf-8-sig", "replace")
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise DataError(
            f"{path}: the first line is {','.join(header or [])!r}; expected 'ImageId,PredictionString' "
            f"(the LOC_val_solution.csv format)"
        )
    out: dict[str, str] = {}
    for lineno, row in enumerate(rows, 2):
        if not row:
            continue
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens or not WNID.match(tokens[0]):
            raise DataError(
                f"{path}, line {lineno}: {','.join(row)!r} has no WNID (nXXXXXXXX) as the first token "
                f"of PredictionString"
            )
        image = row[0].strip()
        out[image if image.endswith(".JPEG") else f"{image}.JPEG"] = tokens[0]
    if not out:
        raise DataError(f"{path} lists no images")
    return out


# --------------------------------------------------------------------------------------------------
# Archives


def _archive_files(path: str, entry: Callable[[tarfile.TarFile, tarfile.TarInfo, str], _T]) -> Iterator[_T]:
    """Yield ``entry(tar, member, basename)`` for each regular file of the tar at ``path``, in stream order.

    ``entry`` runs inside the guard, so a stream that breaks while it reads a member is reported as
    a damaged archive like one that breaks between members.
    """
    try:
        with open_input(path) as (f, _), tarfile.open(fileobj=f, mode="r|", bufsize=_READ) as tar:
            for member in tar:
                if member.isfile():
                    yield entry(tar, member, posixpath.basename(member.name))
    except _BROKEN as e:
        raise _damaged(path, e) from e


def iter_train_classes(path: str) -> Iterator[tuple[str, int, Iterator[tuple[str, bytes]]]]:
    """Yield ``(wnid, archived_size, images)`` per class tar of the training archive.

    ``images`` yields ``(name, data)``; it must be consumed (or dropped) before the next class is
    requested, since the archive is one stream. Dropping it skips the class (its bytes are still read).
    """

    def entry(
        outer: tarfile.TarFile, member: tarfile.TarInfo, name: str
    ) -> tuple[str, int, Iterator[tuple[str, bytes]]]:
        if not name.endswith(".tar") or not WNID.match(name[:-4]):
            raise DataError(
                f"{path} holds {member.name!r}; the training archive must hold one tar per class "
                f"named nXXXXXXXX.tar (ILSVRC2012_img_train.tar). Was it unpacked and re-packed?"
            )
        return name[:-4], member.size, _inner_images(outer.extractfile(member), path, name)

    yield from _archive_files(path, entry)


def _inner_images(f: IO[bytes], archive: str, class_tar: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=f, mode="r|", bufsize=_READ) as inner:
            for m in inner:
                if m.isfile():
                    name = posixpath.basename(m.name)
                    if name.startswith(".") or "/" in name:
                        continue
                    yield name, inner.extractfile(m).read()
    except _BROKEN as e:
        raise DataError(
            f"{archive} is damaged or ends early (inside the class archive {class_tar}: "
            f"{type(e).__name__}: {e}); compare its size and checksum with the official archive, replace "
            f"it and run the same command again: finished classes are kept"
        ) from e


def iter_val_images(path: str) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for every image of the validation archive."""

    def entry(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> tuple[str, bytes]:
        if not VAL_NAME.match(name):
            raise DataError(
                f"{path} holds {member.name!r}; the validation archive holds "
                f"ILSVRC2012_val_NNNNNNNN.JPEG files only (ILSVRC2012_img_val.tar)"
            )
        return name, tar.extractfile(member).read()

    yield from _archive_files(path, entry)
