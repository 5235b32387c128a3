"""The one exception type the data layer raises for problems a user can fix."""

from __future__ import annotations

from pipeline.core.errors import UserError


class DataError(UserError, ValueError):
    """Bad dataset, bad data settings or an unusable checkpoint state.

    Raised before any training step runs, identically on every rank (the checks only read the
    filesystem and the config), so a broken dataset stops the job instead of hanging a collective.
    The message names the path or config key at fault and what to change.
    """

    same_on_every_rank = True
