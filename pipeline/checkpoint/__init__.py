"""Checkpoints on any storage: atomic, verified, uploaded in the background, resumed exactly.

* ``checkpointer``: ``Checkpointer``, what every rank calls to save, commit, wait and resume; it builds the
  shared ``RunContext`` and hands each call to the save or the resume part;
* ``context``: ``RunContext``, what the save and resume parts share about one run on one rank;
* ``save``: ``Saver``, the save path (stage, bound the pending uploads, commit, wait, stop while storage is down);
* ``resume``: ``Resumer``, the resume path (recover staged steps, choose, verify, load, set aside);
* ``layout``: the storage side (tags, manifests, ``latest``, parts and the commit, choosing and verifying,
  retention); tools and ``pipeline.evaluate`` import what they need from there;
* ``upload``: the background upload thread of each rank, and the staging folder's markers;
* ``reshard``: resuming ZeRO-1 on another world size.
"""

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.layout import CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]
