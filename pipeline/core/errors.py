"""The one base for errors a user can fix, and the exit code each carries.

Every such error's message names the file, config key or URI at fault and what to do. The entry points
(``pipeline.train``, ``pipeline.evaluate``) catch ``UserError`` once and exit with its code; anything else is a
bug or an outage and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import ClassVar


class UserError(Exception):
    """An error the user can fix (a bad config value, dataset, checkpoint or environment)."""

    # 2: "usage", as argparse exits for a bad flag; distinct from a crash (1) and a stop (75, core.stop).
    exit_code: ClassVar[int] = 2
    # True where every rank checks the same inputs and fails alike (config, data, start-up checks): rank 0's
    # line is enough. False where one rank may fail alone (a checkpoint part only that rank reads).
    same_on_every_rank: ClassVar[bool] = False


def error_line(e: BaseException, *, rank: int) -> str | None:
    """The ``error: ...`` line this rank prints for ``e``, or None when rank 0 speaks for every rank."""
    if rank != 0 and isinstance(e, UserError) and e.same_on_every_rank:
        return None
    return f"error{'' if rank == 0 else f' (rank {rank})'}: {e}"


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and what is allowed."""

    same_on_every_rank = True  # every rank reads the same files and flags


# How long a rank that stays silent waits before it exits, on rank 0's node: torchrun stops the node's whole group
# as soon as one worker exits, so a silent rank that exits first could kill rank 0 before rank 0 has printed the
# line it speaks for all. On the other nodes a silent rank exits at once: its node's torchrun would otherwise
# outlive rank 0's (whose store it needs) and end in a connection error instead of the workers' exit code.
SILENT_RANK_GRACE_S = 5.0


def report_error(
    e: BaseException, *, rank: int, fmt: Callable[[str], str] = str, grace_s: float = SILENT_RANK_GRACE_S
) -> None:
    """Print this rank's ``error:`` line for ``e`` to stderr; a rank that rank 0 speaks for, on rank 0's node
    (``rank < LOCAL_WORLD_SIZE``), waits ``grace_s`` first."""
    line = error_line(e, rank=rank)
    if line is None:
        if rank < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            time.sleep(grace_s)
        return
    print(fmt(line), file=sys.stderr, flush=True)
