"""pipeline.core.retry: the backoff schedule, attempt limits, deadlines, retryable errors, stopping, logging."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipeline.core.retry import Backoff, RetryStopped, retry


class Flaky:
    """Fails ``n`` times with ``error``, then returns "ok"."""

    def __init__(self, n: int, error: type[BaseException] = OSError) -> None:
        self.n, self.error, self.calls = n, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise self.error(f"failure {self.calls}")
        return "ok"


def test_backoff_is_exponential_and_capped() -> None:
    assert [Backoff(first_s=1, factor=2, max_s=10).delay(i) for i in range(6)] == [1, 2, 4, 8, 10, 10]
    assert Backoff(first_s=0.05, factor=1.5, max_s=1.0).delay(1) == pytest.approx(0.075)
    assert Backoff(first_s=1, max_s=30).delay(10**6) == 30  # a long outage does not overflow


def test_retries_until_success_with_the_schedule(caplog: pytest.LogCaptureFixture) -> None:
    slept: list[float] = []
    fn = Flaky(3)
    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        assert retry(fn, what="upload x", backoff=Backoff(first_s=1, max_s=3), sleep=slept.append) == "ok"
    assert fn.calls == 4 and slept == [1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"upload x failed (failure {i}); retry {i} in {d:.1f} s" for i, d in ((1, 1), (2, 2), (3, 3))]
    assert lines[3] == "upload x succeeded after 3 retries"


def test_attempt_limit_raises_the_last_error() -> None:
    fn = Flaky(5)
    with pytest.raises(OSError, match="failure 3"):
        retry(fn, what="x", attempts=3, sleep=lambda s: None)
    assert fn.calls == 3


def test_deadline_stops_retrying() -> None:
    fn = Flaky(100)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        retry(fn, what="x", backoff=Backoff(first_s=0.05, factor=2, max_s=0.05), deadline_s=0.3)
    assert 0.2 < time.monotonic() - t0 < 1.0 and 3 <= fn.calls <= 7


def test_only_retryable_errors_are_retried() -> None:
    fn = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        retry(fn, what="x", retryable=lambda e: isinstance(e, OSError), sleep=lambda s: None)
    assert fn.calls == 1
    with pytest.raises(KeyboardInterrupt):  # never retried by default
        retry(Flaky(1, KeyboardInterrupt), what="x", sleep=lambda s: None)


def test_should_stop_ends_the_wait_between_attempts() -> None:
    stop = threading.Event()
    fn = Flaky(100)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(RetryStopped):
        retry(fn, what="x", backoff=Backoff(first_s=30), should_stop=stop.is_set, sleep=stop.wait)
    assert time.monotonic() - t0 < 5 and fn.calls == 1  # the 30 s wait was cut short
    fn = Flaky(0)
    with pytest.raises(RetryStopped):  # checked before the first attempt too
        retry(fn, what="x", should_stop=lambda: True)
    assert fn.calls == 0


def test_on_retry_replaces_the_log_line_and_nested_stops_propagate(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, int, float]] = []
    with caplog.at_level(logging.WARNING, logger="pipeline.retry"):
        retry(
            Flaky(2),
            what="x",
            on_retry=lambda e, n, d: seen.append((str(e), n, d)),
            sleep=lambda s: None,
            log_recovery=False,
        )
    assert seen == [("failure 1", 1, 1.0), ("failure 2", 2, 2.0)] and not caplog.records

    def inner() -> None:
        retry(Flaky(0), what="inner", should_stop=lambda: True)

    calls: list[int] = []
    with pytest.raises(RetryStopped):  # an outer retry does not retry a stopped inner one
        retry(lambda: calls.append(1) or inner(), what="outer", sleep=lambda s: None)
    assert calls == [1]
