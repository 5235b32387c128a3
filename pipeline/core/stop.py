"""The stop/requeue contract with the launch scripts (launch/torchrun_node.sh, launch/slurm_lib.sh).

Stop requests (SLURM's --signal=USR1@T, preemption's SIGTERM) become a flag read at step boundaries. No work
happens in the handler: saving from inside a signal handler could interrupt a collective or a half-written
file. The trainer agrees on the flag across ranks, saves, commits and exits with ``STOP_EXIT_CODE`` so a
launcher knows to requeue.

The stop record is rank 0's word to the batch script that this allocation stopped with a committed
checkpoint. srun merges its tasks' exit codes into the highest one, and a node whose peer failed is stopped by
SIGTERM (``--kill-on-bad-exit``) and reports the stop code too, so an exit code cannot tell "every rank saved,
requeue me" from "something failed". The launch scripts therefore name a file per job and restart in
``PIPELINE_STOP_RECORD``; rank 0 writes it once every rank has stopped and the stop's checkpoint is committed,
and the batch script requeues only when it finds it. Outside SLURM (the variable unset) nothing is written.

A stop can come before the workers can take it. While torchrun is still in its rendezvous (no worker exists),
launch/torchrun_node.sh ends it and writes the record itself, with ``"by": "launcher <node>"``, ``"step":
null`` and no checkpoint (nothing was trained: the next start begins or resumes as before); the batch script
trusts such a record only when every node reported a stop. Once the workers exist but have not installed
their handler yet (importing torch takes seconds), a SIGTERM would kill them: the launcher writes the signal
file instead, and ``StopFlag.install`` reads it, so the stop set before the handler existed is not lost.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from pipeline.core.storage import Storage

# EX_TEMPFAIL: "try again later", distinct from success (0) and from a crash (1).
STOP_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# launch/torchrun_node.sh passes a stop on to the workers as SIGTERM and writes the signal it got itself
# (e.g. "SIGUSR1") to this file first, so the log names the signal the operator or SLURM sent.
SIGNAL_FILE_ENV = "PIPELINE_STOP_SIGNAL_FILE"
# The stop record's file, named by launch/slurm_lib.sh.
STOP_RECORD_ENV = "PIPELINE_STOP_RECORD"
# Who wrote a stop record: rank 0 after a committed stop; launch/torchrun_node.sh writes "launcher <node>".
RECORD_BY_RANK0 = "rank 0"


class StopFlag:
    """Set by SIGTERM/SIGUSR1; a second signal while saving is recorded, never acted on twice."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._name: str | None = None
        self._relayed = False  # the first signal was SIGTERM: the launcher may have relayed another one
        self.count = 0

    @property
    def signal_name(self) -> str | None:
        """The stop's cause: the first signal's name (the launcher's original one for a relayed SIGTERM)."""
        if self._relayed:
            self._relayed = False
            original = _relayed_signal()
            if original:
                self._name = original
        return self._name

    @signal_name.setter
    def signal_name(self, name: str | None) -> None:
        self._name, self._relayed = name, False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self._name is None:
            # Only the name is kept here; the launcher's file is read when the name is asked for.
            self._name = signal.Signals(signum).name
            self._relayed = signum == signal.SIGTERM
        self._event.set()

    def install(self) -> StopFlag:
        """Handle the stop signals from now on, and take a stop the launcher recorded before they were handled."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handler)
        # Read after the handler is in place: the launcher writes the file before it looks whether a worker
        # handles SIGTERM, so a stop is either signalled to this process or found here.
        early = _relayed_signal()
        if early and not self.is_set:
            self.signal_name = early
            self._event.set()
        return self

    def request(self, reason: str = "requested") -> None:
        self.signal_name = self.signal_name or reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()


def _relayed_signal() -> str | None:
    """The signal launch/torchrun_node.sh received before it sent SIGTERM, when it wrote one down."""
    path = os.environ.get(SIGNAL_FILE_ENV, "")
    try:
        name = Path(path).read_text().strip() if path else ""
    except OSError:
        return None
    return name if name.startswith("SIG") and name[3:].isalnum() else None


def write_stop_record(
    *, step: int, signal: str | None, checkpoint: str, run_id: str, path: str | None = None
) -> Path | None:
    """Write the record (JSON: step, signal, checkpoint tag, run id, time) to ``path``, else to
    ``$PIPELINE_STOP_RECORD``; returns where it went, or None when neither names a file."""
    target = path or os.environ.get(STOP_RECORD_ENV, "")
    if not target:
        return None
    record = {
        "step": step,
        "signal": signal or "",
        "checkpoint": checkpoint,
        "run_id": run_id,
        "by": RECORD_BY_RANK0,
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
