"""DALI pipelines built and torn down on background threads, so that an epoch (or segment) boundary costs no
pipeline start-up and no teardown: :class:`PipelineAhead` builds the next pipelines while the current one runs,
:func:`dispose_pipeline` tears a finished one down.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from typing import Any

# DALI's exit hook (nvidia.dali.pipeline) must be registered before ours, so that ours runs first: see _THREADS.
import nvidia.dali.pipeline  # noqa: F401
import torch


def teardown_pipeline(pipe, device: torch.device) -> None:
    """Tear ``pipe`` down now: DALI's teardown (joining its threads, freeing its buffers) takes 10-40 ms on a CPU and
    more on a GPU, so it runs on a background thread (:func:`dispose_pipeline`, or the thread that builds ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # copies out of its buffers may still be queued on torch's stream
    shutdown = getattr(pipe, "_shutdown", None)  # what Pipeline.__del__ calls (DALI 2.4)
    if shutdown is not None:
        shutdown()


def dispose_pipeline(pipe, device: torch.device) -> None:
    """Tear ``pipe`` down on a background thread."""
    background(lambda: teardown_pipeline(pipe, device), name="dali-teardown")


# Threads that build or tear down DALI pipelines. They are daemons (one stuck on storage must not hang the process
# at exit), but one still inside DALI while the interpreter finalises aborts it ("terminate called without an
# active exception"), so an exit waits for them first. Registered after DALI's own exit hook, so it runs before it.
_THREADS: set[threading.Thread] = set()
_THREADS_LOCK = threading.Lock()


def background(target: Callable[[], None], *, name: str) -> threading.Thread:
    def run() -> None:
        try:
            target()
        finally:
            with _THREADS_LOCK:
                _THREADS.discard(threading.current_thread())

    thread = threading.Thread(target=run, daemon=True, name=name)
    with _THREADS_LOCK:
        _THREADS.add(thread)
    thread.start()
    return thread


@atexit.register
def _join_background(timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with _THREADS_LOCK:
            threads = list(_THREADS)
        if not threads or time.monotonic() > deadline:
            return
        threads[0].join(timeout=max(0.0, deadline - time.monotonic()))


class PipelineAhead:
    """Pipelines built on a background thread for later segments or epochs, each handed over when it is read.

    DALI pipelines are independent objects (its graph-building context is thread-local), so the next
    epoch's can be built, and its prefetch queue filled, while the current one runs. Several keys (the
    pipelines read one after the other) are built in turn on one thread. An error while building is kept
    and raised by :meth:`take`, at the point where a synchronous build would have raised; the keys after
    it are not built.
    """

    def __init__(self) -> None:
        self.keys: tuple[Any, ...] = ()  # what the pipelines being built are for, in reading order
        self._thread: threading.Thread | None = None
        self._results: dict[Any, Any] = {}
        self._error: tuple[Any, BaseException] | None = None

    def start(self, keys: tuple[Any, ...], build: Callable[[Any], Any]) -> None:
        self.drop()
        self.keys = keys

        def work() -> None:
            for key in keys:
                try:
                    self._results[key] = build(key)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer by take()
                    self._error = (key, e)
                    return

        self._thread = background(work, name=f"dali-ahead-{keys[0]}")

    def take(self, key: Any) -> Any:
        """What ``build`` returned for ``key``, if it was started for it (else None; stale ones are dropped)."""
        if key not in self.keys:
            self.drop()
            return None
        assert self._thread is not None
        self._thread.join()
        if self._error is not None and self._error[0] == key:
            error = self._error[1]
            self._clear()
            raise error
        result = self._results.pop(key, None)
        self.keys = self.keys[self.keys.index(key) + 1 :]
        if not self.keys:
            self._clear()
        return result

    def drop(self) -> None:
        if self._thread is not None:
            self._thread.join()  # a pipeline being built cannot be abandoned half-way
        self._clear()

    def _clear(self) -> None:
        self.keys, self._thread, self._results, self._error = (), None, {}, None
