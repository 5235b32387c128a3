"""The sharded dataset layout: WebDataset tar shards, DALI index files and one manifest per split.

A sharded split is a folder (local or ``s3://``) holding::

    manifest.json                 # this module's ShardManifest
    shard-000000.tar              # WebDataset layout: <key>.jpg + <key>.cls (class index as ASCII digits)
    shard-000000.idx              # DALI's index for readers.webdataset (wds2idx format)
    shard-000001.tar ...

The writer (``python -m pipeline.tools.prepare ... --format shards``), the checker
(``python -m pipeline.tools.validate``) and the training source all read and write the manifest through
this module, so its schema has one home. Shards may differ in size (the last one is usually short);
``samples`` per shard is what lets ranks split an epoch exactly without opening any tar.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.storage import Storage, StorageError, sha256_file
from pipeline.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "webdataset-dali"
VERSION = 1
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
EXTENSIONS = ("jpg", "cls")  # what each sample holds, in the order DALI's reader returns them
INDEX_VERSION = "v1.2"  # the first token of a DALI webdataset index (what DALI's wds2idx writes)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name of the tar, relative to the split folder
    samples: int  # samples (jpg + cls pairs) in this shard
    bytes: int  # size of the tar
    sha256: str  # of the tar
    index: str  # file name of its DALI index
    index_sha256: str


@dataclass(frozen=True)
class ShardManifest:
    num_classes: int
    shards: list[ShardInfo] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # class folder names, index = label
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, uri: str) -> ShardManifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            shards = [ShardInfo(**s) for s in data["shards"]]
            manifest = cls(num_classes=int(data["num_classes"]), shards=shards, classes=list(data.get("classes", [])))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(
                f"{uri} is not a shard manifest this version reads ({e}); re-create the shards with "
                "`python -m pipeline.tools.prepare ... --format shards`"
            ) from e
        if not manifest.shards or any(s.samples <= 0 for s in manifest.shards):
            raise DataError(f"{uri} lists no shards or an empty shard; re-create the shards")
        return manifest


def is_sharded(store: Storage) -> bool:
    """Whether the split folder ``store`` holds a shard manifest."""
    return store.exists(MANIFEST)


def read_manifest(store: Storage) -> ShardManifest:
    uri = store.url(MANIFEST)
    try:
        text = store.read_text(MANIFEST)
    except StorageError as e:
        raise DataError(f"cannot read the shard manifest {uri}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{uri} is not text ({e}); re-create the shards") from e
    return ShardManifest.from_json(text, uri=uri)


def write_manifest(store: Storage, manifest: ShardManifest) -> None:
    """Written last, after every shard and index: a folder with a manifest is complete."""
    store.write_text(MANIFEST, manifest.to_json())


def describe(manifest: ShardManifest) -> dict[str, Any]:
    return {"shards": len(manifest.shards), "samples": manifest.num_samples, "classes": manifest.num_classes}


# -- writing one shard ---------------------------------------------------------------------------------


def write_shard(tar_path: str, samples: Iterable[tuple[str, bytes, int]], *, index_path: str = "") -> ShardInfo:
    """Write one WebDataset shard ``tar_path`` (``<key>.jpg`` + ``<key>.cls`` per sample, in the given order) and
    its DALI index (``index_path``, default beside it as :func:`index_name`); returns its manifest entry.

    ``samples`` yields ``(key, jpeg_bytes, label)``; keys must be unique and contain no "." or "/" (DALI splits a
    member name at its first dot). The tar is byte-reproducible (fixed mtime, owner and mode), so the same images
    give the same sha256. Both files are written through a temporary sibling and renamed: they appear whole.
    """
    index_path = index_path or index_name(tar_path)
    entries: list[list[tuple[str, int, int, str]]] = []
    tmp = f"{tar_path}.tmp-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, label in samples:
                if not key or "." in key or "/" in key:
                    raise DataError(f"shard sample key {key!r} is empty or holds '.' or '/'; {tar_path} not written")
                members = []
                for ext, data in zip(EXTENSIONS, (bytes(jpeg), str(int(label)).encode()), strict=True):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    # The data follows the member's header (one 512-byte block for USTAR names).
                    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                    tar.addfile(info, io.BytesIO(data))
                    members.append((ext, offset, len(data), info.name))
                entries.append(members)
        if not entries:
            raise DataError(f"shard {tar_path} would hold no samples")
        with open(f"{index_path}.tmp-{os.getpid()}", "w") as f:
            f.write(index_text(entries))
        os.replace(f"{index_path}.tmp-{os.getpid()}", index_path)
        os.replace(tmp, tar_path)
    finally:
        for leftover in (tmp, f"{index_path}.tmp-{os.getpid()}"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    tar = sha256_file(tar_path)
    return ShardInfo(
        name=os.path.basename(tar_path),
        samples=len(entries),
        bytes=tar.size,
        sha256=tar.sha256,
        index=os.path.basename(index_path),
        index_sha256=sha256_file(index_path).sha256,
    )


# -- DALI index files ------------------------------------------------------------------------------------


def index_text(entries: Sequence[Sequence[tuple[str, int, int, str]]]) -> str:
    """A DALI webdataset index: a header, then per sample its members as ``ext offset size name``."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in entries]
    return "\n".join(lines) + "\n"


def parse_index(text: str, *, uri: str) -> list[str]:
    """The per-sample lines of a DALI webdataset index (header checked), for cutting sample ranges out of it."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise DataError(
            f"{uri} is not a DALI webdataset index of version {INDEX_VERSION} with as many lines as it declares; "
            "re-create the shards"
        )
    return lines[1:]


def sub_index(sample_lines: Sequence[str]) -> str:
    """An index over some of a shard's samples (lines from :func:`parse_index`): DALI then reads only those."""
    return f"{INDEX_VERSION} {len(sample_lines)}\n" + "".join(f"{ln}\n" for ln in sample_lines)
