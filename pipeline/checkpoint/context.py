"""What the save and resume paths share about one run's checkpoints on this rank (``RunContext``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CheckpointConfig
from pipeline.core.storage import Storage


@dataclass
class RunContext:
    """One run on one rank, as ``Checkpointer`` set it up; the save and resume parts read it, and only
    ``Checkpointer`` changes it (its attributes of the same names)."""

    cfg: CheckpointConfig
    run_id: str
    rank: int
    world_size: int
    local_rank: int
    config_hash: str
    # What every manifest records about the run besides the checkpoint, and what a resume compares: "model"
    # (pipeline.wiring.model_record), "config" (the flattened experiment keys), "global_batch", "batch_size",
    # "grad_accum". Absent keys are neither recorded nor compared.
    record: dict[str, Any]
    storage_options: dict[str, Any]  # for every Storage opened on checkpoint.* settings
    store: Storage  # the run folder
    staging: Path  # this run's node-local staging folder
    group: Any  # for control collectives: a CPU (gloo) group, cheap, and never on the training stream
    # One id per process lifetime, the same on all ranks, so the commit never trusts parts left over by a
    # crashed earlier attempt at the same step.
    session: str
