"""What a run read, as MLflow dataset inputs: one record per split, with its source, size and a digest.

The digest identifies the data, cheaply and stably: sha256 over the split's sorted file index (paths
relative to the split folder, with their labels), which the folder scan already built, so the same tree
in another place has the same digest and an added, removed or relabelled image changes it. Synthetic
data has no files: its digest covers what generates it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import DataConfig
from pipeline.data.folder import SplitIndex

CONTEXTS = {"train": "training", "val": "validation"}  # MLflow's usual mlflow.data.context values


@dataclass(frozen=True)
class DatasetRecord:
    """One split of a run's dataset, as MLflow's dataset input shows it."""

    name: str  # e.g. "digits-train"
    digest: str  # 16 hex digits (MLflow keeps at most 36 characters)
    source_type: str  # "local", "s3", "gs", ..., or "code" for generated data
    source: str  # the split's folder or URL, or what generates it
    num_samples: int
    context: str  # "training" or "validation"

    def profile(self) -> str:
        return json.dumps({"num_samples": self.num_samples})


def dataset_name(cfg: DataConfig) -> str:
    """The dataset's short name: digits, synthetic, or the folder's style (cifar / imagenet)."""
    return cfg.source if cfg.source != "folder" else cfg.style


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _relative(path: str, base: str) -> str:
    # A prefix cut, not os.path.relpath: the scan joined every file onto its split folder, and an ImageNet
    # index has 1.28 million of them.
    prefix = base.rstrip("/" + os.sep)
    return path[len(prefix) + 1 :].replace(os.sep, "/") if path.startswith(prefix) else path


def split_classes(source: Any) -> tuple[str, ...] | None:
    """The class names of a built source, in label order (its folder index or shard manifest); None for
    generated data, whose classes have no names."""
    index = getattr(source, "index", None)
    if isinstance(index, SplitIndex):
        return tuple(index.classes)
    manifest = getattr(source, "manifest", None)
    return tuple(manifest.classes) if manifest is not None else None


def describe_split(cfg: DataConfig, *, split: str, source: Any) -> DatasetRecord:
    """The record of one built source (``pipeline.data.build_source``'s result) of split ``split``."""
    index = getattr(source, "index", None)
    if isinstance(index, SplitIndex):
        entries = sorted((_relative(f, index.path), label) for f, label in zip(index.files, index.labels, strict=True))
        scheme = index.path.split("://", 1)[0] if "://" in index.path else "local"
        where = index.path if "://" in index.path else os.path.abspath(index.path)
        digest = _digest({"classes": list(split_classes(source) or ()), "files": entries})
    elif getattr(source, "manifest", None) is not None:  # a sharded split: its manifest names every byte
        path = source.split_uri
        scheme = path.split("://", 1)[0] if "://" in path else "local"
        where = path if "://" in path else os.path.abspath(path)
        digest = _digest(
            {"classes": list(split_classes(source) or ()), "shards": [s.sha256 for s in source.manifest.shards]}
        )
    else:  # generated on the fly: the digest covers the generation parameters
        scheme, where = "code", f"pipeline.data.{cfg.source}"
        digest = _digest(
            {
                "source": cfg.source,
                "split": split,
                "image_size": cfg.image_size,
                "batches": cfg.synthetic_batches,
                "batch_size": cfg.batch_size,
                "seed": getattr(source, "seed", None),
            }
        )
    return DatasetRecord(
        name=f"{dataset_name(cfg)}-{split}",
        digest=digest,
        source_type=scheme,
        source=where,
        num_samples=int(source.num_samples),
        context=CONTEXTS.get(split, split),
    )
