"""Dataset archives (the CIFAR-10 JPEG tarball): verified, extracted once, atomically, into the cache.

``data.root`` may name a ``.tar.gz`` / ``.tgz`` / ``.tar`` file instead of a folder; then

    root = extract_archive(cfg.root, cache_dir=cfg.cache_dir, sha256=cfg.root_sha256)

returns the ImageFolder root inside ``<cache_dir>/<archive name>/``. The archive is hashed (when a
sha256 is given) and unpacked into a private temporary folder that is renamed into place with a marker
written last, so a reader only ever sees a complete tree, and a second call, from any rank, returns at
once. A changed archive (another size or mtime) is extracted again.

Training calls it at start-up (``pipeline.data.build.prepare_dataset_root``) when ``data.root`` names an archive;
:mod:`pipeline.tools.cifar10` writes such a tree from the official CIFAR-10 download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from pipeline.core.storage import sha256_file
from pipeline.data.cache import build_once
from pipeline.data.errors import DataError

# sha256 of cifar10-jpeg.tar.gz, the CIFAR-10 JPEG archive (class folders) that configs/cifar10 names.
CIFAR10_SHA256 = "efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4"
HOW_TO_GET_CIFAR10 = (
    "the configs in configs/cifar10 read the CIFAR-10 JPEG archive cifar10-jpeg.tar.gz (class folders) at data.root; "
    "without it, download the python version (cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html, run "
    "`python -m pipeline.tools.cifar10 cifar-10-python.tar.gz data/cifar10` (writes data/cifar10/{train,test}/<class>/"
    "*.png) and pass --data.root=data/cifar10 --data.root_sha256=''"
)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_VERSION = 1
_REPO_ROOT = Path(__file__).resolve().parents[2]


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def resolve_archive(path: str) -> Path:
    """``path`` as given, else relative to the repository (configs name their archives relative to the checkout)."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    in_repo = _REPO_ROOT / p
    return in_repo if in_repo.is_file() else p


def sha256_of(path: Path) -> str:
    return sha256_file(path).sha256


def extract_archive(path: str, *, cache_dir: str, sha256: str = "") -> str:
    """Extract the archive at ``path`` once into ``cache_dir`` and return the dataset root inside it.

    The root is the archive's single top-level folder when it has exactly one (``cifar10-jpeg/``), else
    the extraction folder. Raises :class:`DataError` for a missing, unreadable or mismatching archive, and
    for a folder at ``<cache_dir>/<archive name>`` that was not extracted here (it is never deleted).
    """
    archive = resolve_archive(path)
    if not archive.is_file():
        raise DataError(
            f"dataset archive {path} does not exist (looked in the working directory and in "
            f"{_REPO_ROOT}). {HOW_TO_GET_CIFAR10}"
        )
    st = archive.stat()
    stamp = {"version": _VERSION, "archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    dest = Path(cache_dir).expanduser().resolve() / name
    marker = build_once(dest, stamp=stamp, build=lambda tmp: _extract(archive, tmp, sha256=sha256))
    return str(dest / marker["root"]) if marker.get("root") else str(dest)


def _extract(archive: Path, into: Path, *, sha256: str) -> dict[str, str]:
    if sha256:
        got = sha256_of(archive)
        if got != sha256.lower():
            raise DataError(
                f"dataset archive {archive} has sha256 {got}, but data.root_sha256 = {sha256}: the file is "
                f"damaged or a different dataset; fetch it again, or set --data.root_sha256='' to skip "
                f"the check. {HOW_TO_GET_CIFAR10}"
            )
    _unpack(archive, into)
    entries = [e for e in into.iterdir() if not e.name.startswith(".")]
    return {"root": entries[0].name if len(entries) == 1 and entries[0].is_dir() else ""}


def _unpack(archive: Path, into: Path) -> None:
    tar = shutil.which("tar")
    if tar is None:
        try:
            with tarfile.open(archive) as tf:
                # "data" refuses absolute paths, links out of the tree and device files.
                tf.extractall(into, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(
                f"dataset archive {archive} cannot be extracted ({type(e).__name__}: {e}); it is "
                f"truncated or not a tar archive. {HOW_TO_GET_CIFAR10}"
            ) from e
        return
    # The tar program, when there is one: Python's tarfile takes ~40 s for CIFAR's 60,000 members on two
    # slow cores, tar ~4 s. It already drops leading "/" and refuses ".." in member names.
    r = subprocess.run([tar, "-xf", str(archive), "-C", str(into), "--no-same-owner"], capture_output=True, text=True)
    if r.returncode != 0:
        raise DataError(
            f"dataset archive {archive} cannot be extracted (tar: {r.stderr.strip()[-400:]}); it is "
            f"truncated or not a tar archive. {HOW_TO_GET_CIFAR10}"
        )
    for dirpath, dirnames, filenames in os.walk(into):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not (os.path.isfile(p) or os.path.isdir(p)):
                raise DataError(
                    f"dataset archive {archive} holds {os.path.relpath(p, into)}, a link or special "
                    f"file; an image dataset has only folders and files, so it is not extracted"
                )
