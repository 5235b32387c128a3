"""Checkpoints on any storage: atomic, verified, uploaded in the background, resumed exactly.

* ``layout``: the storage side (tags, manifests, ``latest``, parts, choosing and verifying, retention);
* ``checkpointer``: ``Checkpointer``, what every rank calls to save, commit, wait and resume;
* ``upload``: the background upload thread of each rank;
* ``reshard``: resuming ZeRO-1 on another world size.
"""

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.layout import (
    FORMAT,
    LATEST,
    MANIFEST,
    CheckpointError,
    apply_retention,
    committed_candidates,
    committed_tags,
    first_good,
    list_steps,
    read_manifest,
    read_parts,
    set_aside,
    step_of,
    storage_options,
    tag_for,
    verified_file,
)
from pipeline.checkpoint.upload import PartsMissing, Uploader, UploadJob

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "CheckpointError",
    "Checkpointer",
    "PartsMissing",
    "UploadJob",
    "Uploader",
    "apply_retention",
    "committed_candidates",
    "committed_tags",
    "first_good",
    "list_steps",
    "read_manifest",
    "read_parts",
    "set_aside",
    "step_of",
    "storage_options",
    "tag_for",
    "verified_file",
]
