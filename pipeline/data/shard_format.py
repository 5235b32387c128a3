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

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..storage import Storage, StorageError
from .errors import DataError

MANIFEST = "manifest.json"
FORMAT = "webdataset-dali"
VERSION = 1
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
EXTENSIONS = ("jpg", "cls")  # what each sample holds, in the order DALI's reader returns them


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
