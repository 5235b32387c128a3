"""The stop record: rank 0's word to the batch script that this allocation stopped with a committed checkpoint.

srun merges its tasks' exit codes into the highest one, and a node whose peer failed is stopped by SIGTERM
(``--kill-on-bad-exit``) and reports the stop code too, so an exit code cannot tell "every rank saved, requeue
me" from "something failed". The launch scripts (launch/slurm_lib.sh) therefore name a file per job and
restart in ``PIPELINE_STOP_RECORD``; rank 0 writes it once every rank has stopped and the stop's checkpoint is
committed, and the batch script requeues only when it finds it. Outside SLURM (the variable unset) nothing is
written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.storage import Storage

ENV_VAR = "PIPELINE_STOP_RECORD"


def write_stop_record(
    *, step: int, signal: str | None, checkpoint: str, run_id: str, path: str | None = None
) -> Path | None:
    """Write the record (JSON: step, signal, checkpoint tag, run id, time) to ``path``, else to
    ``$PIPELINE_STOP_RECORD``; returns where it went, or None when neither names a file."""
    target = path or os.environ.get(ENV_VAR, "")
    if not target:
        return None
    record = {
        "step": step,
        "signal": signal or "",
        "checkpoint": checkpoint,
        "run_id": run_id,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    p = Path(target)
    # Atomic: the batch script reads it on another node of a shared filesystem and must never see half of it.
    Storage(str(p.parent)).write_text(p.name, json.dumps(record) + "\n")
    return p


def read_stop_record(path: str | Path) -> dict[str, object] | None:
    """The record at ``path``, or None when there is none."""
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else None
