"""The one retry policy: exponential backoff with a cap, optional attempt limit and deadline.

    retry(lambda: store.put(path, rel), what=f"upload {rel}", backoff=Backoff(first_s=1, max_s=30),
          retryable=lambda e: not isinstance(e, ValueError), should_stop=closing.is_set, sleep=closing.wait)

``Backoff`` alone is the delay schedule, for loops that cannot be a single call (a queue worker that
backs off between units of work, a collective poll); ``retry`` runs one call until it succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("pipeline.retry")


@dataclass(frozen=True)
class Backoff:
    """Delays ``first_s``, ``first_s * factor``, ... never above ``max_s``."""

    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, retry: int) -> float:
        """The wait before retry number ``retry + 1`` (``retry`` counts from 0)."""
        # min() first on the exponent keeps a long outage from overflowing the float.
        return min(self.max_s, self.first_s * self.factor ** min(retry, 1000))


class RetryStopped(Exception):
    """``should_stop`` asked to stop between attempts; the call did not succeed."""


def _default_note(logger: logging.Logger, what: str) -> Callable[[BaseException, int, float], None]:
    def note(error: BaseException, retry: int, delay: float) -> None:
        logger.warning("%s failed (%s); retry %d in %.1f s", what, error, retry, delay)

    return note


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    backoff: Backoff = Backoff(),
    attempts: int | None = None,
    deadline_s: float | None = None,
    retryable: Callable[[BaseException], bool] = lambda e: isinstance(e, Exception),
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    log_recovery: bool = True,
    logger: logging.Logger = log,
) -> T:
    """Call ``fn`` until it returns; return its result.

    A failure that ``retryable`` accepts is retried after ``backoff.delay(n)``; any other error, the
    last error once ``attempts`` calls failed, or one whose next attempt would start after
    ``deadline_s`` seconds (from now), is raised. ``should_stop`` is checked before every attempt
    (RetryStopped when it says so); ``sleep`` waits between attempts (an ``Event.wait`` makes a stop
    interrupt the wait). Each retry is announced by ``on_retry(error, retry_number, delay)``, by default a
    warning naming ``what``; a success after retries logs "<what> succeeded after N retries" unless
    ``log_recovery`` is False."""
    start = time.monotonic()
    note = on_retry or _default_note(logger, what)
    failures = 0
    while True:
        if should_stop is not None and should_stop():
            raise RetryStopped(what)
        try:
            result = fn()
        except RetryStopped:
            raise  # a nested retry was stopped: so is this one
        except BaseException as e:
            if not retryable(e):
                raise
            delay = backoff.delay(failures)
            failures += 1
            if attempts is not None and failures >= attempts:
                raise
            if deadline_s is not None and time.monotonic() - start + delay > deadline_s:
                raise
            note(e, failures, delay)
            sleep(delay)
            continue
        if failures and log_recovery:
            logger.warning("%s succeeded after %d retries", what, failures)
        return result
