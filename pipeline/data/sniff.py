"""What an image file's bytes say it is: the format of its leading bytes, and the quick check of many files.

The loader runs :func:`quick_scan` over a split when DALI fails without naming a file; the offline
checker (``python -m pipeline.tools.validate``) uses :func:`sniff` before it decodes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from pipeline.core.storage import Storage

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff(head: bytes) -> str | None:
    """The image format the leading bytes announce (jpeg, png, gif, bmp, tiff, webp), or None."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def quick_scan(files: Sequence[str], *, time_budget_s: float = 120.0, workers: int = 16) -> list[tuple[str, str]]:
    """Files (paths or URLs) that are plainly not valid images, from their size and first/last bytes.

    Cheap enough to run over a whole split after a training failure: no decoding. Stops looking
    after ``time_budget_s`` and returns what it found. A JPEG that does not end with its end-of-image
    marker is reported as probably truncated (some valid JPEGs carry trailing bytes, so this is a
    suspicion, not a verdict; ``python -m pipeline.tools.validate`` decides with DALI's decoder).
    """
    deadline = time.monotonic() + time_budget_s

    def check(path: str) -> tuple[str, str] | None:
        if time.monotonic() > deadline:
            return None
        try:
            head, tail, size = _head_tail(path)
        except Exception as e:  # noqa: BLE001 - storage errors of any kind are worth reporting as such
            return path, f"cannot be read ({e})"
        if size == 0:
            return path, "empty (0 bytes)"
        fmt = sniff(head)
        if fmt is None:
            return path, f"not an image (starts with {head[:8]!r})"
        if fmt == "jpeg" and tail != b"\xff\xd9":
            return path, "JPEG without its end-of-image marker (truncated?)"
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = [r for r in pool.map(check, files) if r is not None]
    return found


def _head_tail(path: str) -> tuple[bytes, bytes, int]:
    store, name = Storage.of_file(path)
    size = store.size(name)
    with store.open(name) as f:
        head = f.read(16)
        if size > 16:
            f.seek(size - 2)
        tail = f.read(2) if size > 16 else head[-2:]
    return head, tail, size
