"""Stop requests (SLURM's --signal=USR1@T, preemption's SIGTERM) become a flag read at step boundaries.

No work happens in the handler: saving from inside a signal handler could interrupt a collective or a
half-written file. The trainer agrees on the flag across ranks, saves, commits and exits with
``STOP_EXIT_CODE`` so a launcher knows to requeue.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# EX_TEMPFAIL: "try again later", distinct from success (0) and from a crash (1).
STOP_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; a second signal while saving is recorded, never acted on twice."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.count = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        self._event.set()

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handler)
        return self

    def request(self, reason: str = "requested") -> None:
        self.signal_name = self.signal_name or reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()
