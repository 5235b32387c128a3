"""The background sender: every MLflow call of a training process goes through one thread here.

Training never waits on the network. Calls are queued in order; metric points are coalesced into
``log_batch`` requests of up to 1,000 points. While MLflow is unreachable the queue holds on to
everything (metric points up to ``max_buffered``, then the oldest are dropped, with a warning) and
retries with backoff (``pipeline.core.retry.Backoff``), so the points arrive once the server is back.

Each metric key's step must increase: a point at or below the highest step already logged for its
key is dropped. With the high-water marks read back from the server when a run is resumed, that
makes re-logging the steps between a checkpoint and a crash a no-op instead of duplicate points.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.retry import Backoff

if TYPE_CHECKING:
    from mlflow.entities import Metric

log = logging.getLogger("pipeline.tracking")

MAX_BATCH = 1000  # MLflow's log_batch limit on metric points per request

# Errors that mean "the server or the network is not there right now": retry. Anything else
# (a bad parameter, a missing run) would fail again the same way, so it is reported and dropped.
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "ABORTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
}


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException  # heavy: only a tracked run, which has imported mlflow, gets here

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or "requests" in type(exc).__module__


@dataclass
class _Op:
    seq: int
    fn: Callable[[Any], None]  # receives the MlflowClient
    what: str
    done: threading.Event


@dataclass
class _Point:
    seq: int
    run_id: str | None  # None: the sender's default run, which may not exist yet when the point is queued
    metric: Metric


class BatchSender:
    """One daemon thread that owns an MlflowClient and sends queued calls in order."""

    def __init__(
        self,
        client: Any,
        *,
        uri: str,
        max_buffered: int = 100_000,
        flush_interval_s: float = 2.0,
        max_backoff_s: float = 10.0,
        name: str = "mlflow-sender",
        default_run_id: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.client = client
        self.default_run_id = default_run_id
        self.uri = uri
        self.max_buffered = max(1, max_buffered)
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        # The wait after each failed send in a row: 1 s, 2 s, 4 s, ... up to max_backoff_s.
        self._backoff = Backoff(first_s=1.0, factor=2.0, max_s=max_backoff_s)
        self.batches_sent = 0
        self.points_sent = 0
        self.points_dropped = 0  # overflow while unreachable
        self.points_skipped = 0  # at or below a key's high-water step (re-logged after a resume)
        self._ops: deque[_Op] = deque()
        self._points: deque[_Point] = deque()
        self._high_water: dict[tuple[str, str], int] = {}
        self._attempts: dict[int, int] = {}  # failures of one unit of work while the server answered
        self._seq = 0
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._urgent = 0  # threads waiting in flush(): send now, retry fast
        self._down_since: float | None = None
        self._overflow_warned = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- producer side (training thread) ------------------------------------------------------------
    def submit(self, fn: Callable[[Any], None], what: str) -> threading.Event:
        """Queue one call; the returned event is set once it ran (or was given up as permanent)."""
        with self._cond:
            self._seq += 1
            op = _Op(self._seq, fn, what, threading.Event())
            self._ops.append(op)
            self._cond.notify_all()
        return op.done

    def add_metrics(self, run_id: str | None, metrics: list[Metric]) -> None:
        with self._cond:
            for m in metrics:
                self._seq += 1
                self._points.append(_Point(self._seq, run_id, m))
            self._enforce_bound()
            if len(self._points) >= MAX_BATCH:
                self._cond.notify_all()

    def set_high_water(self, run_id: str, marks: dict[str, int]) -> None:
        with self._cond:
            for key, step in marks.items():
                k = (run_id, key)
                self._high_water[k] = max(step, self._high_water.get(k, step))

    @property
    def pending(self) -> tuple[int, int]:
        """(metric points, other calls) not yet sent."""
        with self._cond:
            return len(self._points), len(self._ops)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far went out; False when the timeout came first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._ops or self._points or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(timeout=min(left, 0.5))
                return True
            finally:
                self._urgent -= 1

    def close(self, timeout_s: float) -> bool:
        """Flush for at most ``timeout_s`` and stop the thread; False when something was left unsent."""
        ok = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=max(1.0, min(timeout_s, 5.0)))
        return ok

    # -- consumer side (sender thread) --------------------------------------------------------------
    def _enforce_bound(self) -> None:
        over = len(self._points) - self.max_buffered
        if over <= 0:
            return
        for _ in range(over):
            self._points.popleft()
        self.points_dropped += over
        if not self._overflow_warned:
            self._overflow_warned = True
            log.warning(
                "MLflow buffer full (%d metric points, tracking.max_buffered): dropping the oldest "
                "points until %s takes data again",
                self.max_buffered,
                self.uri,
            )

    def _take(self) -> _Op | list[_Point] | None:
        """The next unit of work in queue order: one call, or a batch of consecutive points of one run."""
        if self._ops and (not self._points or self._ops[0].seq < self._points[0].seq):
            return self._ops[0]
        if not self._points:
            return None
        limit = self._ops[0].seq if self._ops else None
        run_id = self._points[0].run_id
        batch: list[_Point] = []
        while (
            self._points
            and len(batch) < MAX_BATCH
            and self._points[0].run_id == run_id
            and (limit is None or self._points[0].seq < limit)
        ):
            batch.append(self._points.popleft())
        return batch

    def _ready(self) -> bool:
        return bool(self._ops) or len(self._points) >= MAX_BATCH or (bool(self._points) and self._urgent > 0)

    def _wait_for_work(self, *, backoff: float, last_send: float) -> None:
        """Block (holding the condition) until there is something worth sending, or closing."""
        if backoff:
            start = time.monotonic()
            while not self._closing:
                # A flush() waiting on us shortens the backoff: the caller is about to give up.
                left = start + (min(backoff, 1.0) if self._urgent else backoff) - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(timeout=left)
            return
        while not self._closing and not self._ready():
            if self._points:
                left = last_send + self.flush_interval_s - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(timeout=left)
            else:
                self._cond.wait(timeout=self.flush_interval_s)

    def _loop(self) -> None:
        backoff = 0.0
        failures = 0  # failed sends in a row
        last_send = time.monotonic()
        while True:
            with self._cond:
                self._wait_for_work(backoff=backoff, last_send=last_send)
                if self._closing:
                    return
                work = self._take()
                if work is None:
                    backoff, failures = 0.0, 0
                    continue
                self._busy = True
            try:
                self._run(work)
                backoff, failures = 0.0, 0
                last_send = time.monotonic()
                self._recovered()
            except Exception as e:  # noqa: BLE001 - tracking must never take training down
                if self._should_retry(work, e):
                    self._unreachable(e)
                    backoff = self._backoff.delay(failures)
                    failures += 1
                    if isinstance(work, list):
                        with self._cond:
                            self._points.extendleft(reversed(work))
                            self._enforce_bound()
                else:
                    what = work.what if isinstance(work, _Op) else f"log_batch of {len(work)} points"
                    log.warning(
                        "MLflow rejected %s (%s: %s); dropped, training continues",
                        what,
                        type(e).__name__,
                        str(e).splitlines()[0][:300] if str(e) else "",
                    )
                    if isinstance(work, _Op):
                        self._finish_op(work)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _should_retry(self, work: _Op | list[_Point], e: BaseException) -> bool:
        """Retry through an outage; but an error the server keeps giving while it answers other calls
        is the call's own fault (MLflow reports some of those as INTERNAL_ERROR too): give up after 3."""
        if not is_transient(e):
            return False
        if not self._server_answers():
            return True
        key = work.seq if isinstance(work, _Op) else work[0].seq
        self._attempts[key] = self._attempts.get(key, 0) + 1
        return self._attempts[key] < 3

    def _server_answers(self) -> bool:
        try:
            self.client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _run(self, work: _Op | list[_Point]) -> None:
        if isinstance(work, _Op):
            work.fn(self.client)
            self._finish_op(work)
            return
        keep: list[Metric] = []
        marks: dict[tuple[str, str], int] = {}
        run_id = work[0].run_id or self.default_run_id()
        if run_id is None:
            raise RuntimeError("no MLflow run to log to: it could not be created")
        with self._cond:
            for p in work:
                k = (run_id, p.metric.key)
                hw = marks.get(k, self._high_water.get(k))
                if hw is not None and p.metric.step <= hw:
                    self.points_skipped += 1
                    continue
                marks[k] = p.metric.step
                keep.append(p.metric)
        if keep:
            self.client.log_batch(run_id, metrics=keep)
            self.batches_sent += 1
            self.points_sent += len(keep)
        with self._cond:
            self._high_water.update(marks)

    def _finish_op(self, op: _Op) -> None:
        with self._cond:
            if self._ops and self._ops[0] is op:
                self._ops.popleft()
        op.done.set()

    def _unreachable(self, e: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            points, ops = self.pending
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.warning(
                "MLflow at %s is unreachable (%s): training continues; metrics are buffered "
                "(%d now, up to %d) and sent when it is back",
                self.uri,
                msg,
                points,
                self.max_buffered,
            )

    def _recovered(self) -> None:
        if self._down_since is not None:
            points, _ = self.pending
            log.warning(
                "MLflow at %s is reachable again after %.0f s; sending the buffered metrics "
                "(%d left, %d dropped on overflow)",
                self.uri,
                time.monotonic() - self._down_since,
                points,
                self.points_dropped,
            )
            self._down_since = None
            self._overflow_warned = False
