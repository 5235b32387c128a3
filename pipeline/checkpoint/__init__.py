"""Checkpoints on any storage: atomic, verified, uploaded in the background, resumed exactly.

* ``layout``: the storage side (tags, manifests, ``latest``, parts, choosing and verifying, retention);
  tools and ``pipeline.evaluate`` import what they need from there;
* ``checkpointer``: ``Checkpointer``, what every rank calls to save, commit, wait and resume;
* ``upload``: the background upload thread of each rank;
* ``reshard``: resuming ZeRO-1 on another world size.
"""

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.layout import CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]
