"""Build a folder in the data cache once, atomically, from any number of ranks at once.

    marker = build_once(cache / "digits", stamp={"version": 1}, build=write_tree)

``build(tmp)`` writes the tree into a private temporary folder beside the target and returns extra
fields for the marker; the marker (``stamp`` plus those fields) is written last and the folder renamed
into place, so a reader only ever sees a complete tree. A file lock keeps the ranks of one node from all
doing the work; nodes sharing a filesystem may build in parallel, and the first rename wins.

A target whose marker does not match ``stamp`` (an older version, a changed archive) is ours and is
rebuilt. A target with no marker at all was not made here (a hand-made or half-copied tree), so it is
never deleted: :class:`DataError` says to move it away or to pick another ``--data.cache_dir``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.data.errors import DataError

MARKER = ".complete"


def read_marker(target: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of ``target`` when it is complete and matches ``stamp``, else None."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in stamp.items()):
        return None
    return marker


def build_once(
    target: str | os.PathLike, *, stamp: dict[str, Any], build: Callable[[Path], dict[str, Any] | None]
) -> dict[str, Any]:
    """Make sure ``target`` holds a complete tree for ``stamp`` (building it if not) and return its marker."""
    target = Path(target)
    done = read_marker(target, stamp)
    if done is not None:
        return done
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data.cache_dir {cache}: {e}; set --data.cache_dir to a writable folder") from e
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = read_marker(target, stamp)
            if done is None:
                _refuse_foreign(target)
                done = _build(target, stamp, build)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return done


def _refuse_foreign(target: Path) -> None:
    if os.path.lexists(target) and not (target / MARKER).is_file():
        raise DataError(
            f"{target} exists but was not made by this pipeline (it has no {MARKER} marker), so it is "
            f"left alone; move it away, or set --data.cache_dir to another folder"
        )


def _build(target: Path, stamp: dict[str, Any], build: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp-", dir=target.parent))
    try:
        marker = {**stamp, **(build(tmp) or {})}
        (tmp / MARKER).write_text(json.dumps(marker))
        done = read_marker(target, stamp)
        if done is not None:
            return done  # another node finished first, through a shared filesystem
        _refuse_foreign(target)
        if os.path.lexists(target):
            # Our own stale tree: move it aside first, since rename() cannot replace a non-empty folder.
            stale = tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent)
            os.rename(target, os.path.join(stale, target.name))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another node won the race through a shared filesystem; its tree is identical.
            done = read_marker(target, stamp)
            if done is None:
                raise
            return done
        return marker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
