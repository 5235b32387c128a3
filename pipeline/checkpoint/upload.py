"""Background upload of staged checkpoint files, one thread per rank, retried with backoff.

Training only waits for the local write; this thread copies each finished checkpoint folder to object
storage in save order, then writes this rank's *part* (a small JSON listing its files with size and
sha256). On global rank 0 a commit callback then waits for every rank's part and writes the manifest
and the ``latest`` marker. No collective call happens here: a collective from a second thread would race
the training loop's own collectives, so ranks coordinate through the storage instead.

A failing upload (endpoint down, throttling) is retried forever with exponential backoff
(``pipeline.core.retry``) while training goes on; the local files are deleted only after the upload
succeeded, so nothing is lost. The owner bounds how many checkpoints may wait (``save.Saver``
blocks a new save when too many are pending, for at most ``checkpoint.max_wait_s``) and tells the
uploader what training is doing meanwhile (``activity``), which each retry line repeats.

Staging layout (per rank): ``rank-<R>/step-<N>/`` holds the files, ``rank-<R>/step-<N>.staged.json``
(``staged_marker``) is written once they are complete and names the step, world size and session: a later
start finds unsent steps by it (``resume.Resumer`` uploads them before resuming).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoint.layout import PartsMissing, write_part
from pipeline.core.retry import Backoff, RetryStopped, retry
from pipeline.core.storage import FileInfo, Storage

log = logging.getLogger("pipeline.checkpoint")

# Other ranks still uploading is a wait, not a failure: polled quickly at first, then every 2 s.
_PARTS_WAIT = Backoff(first_s=0.075, factor=1.5, max_s=2.0)


def staged_marker(local_dir: Path) -> Path:
    """The marker beside a staged checkpoint folder: present once its files are complete, gone once uploaded."""
    return local_dir.parent / f"{local_dir.name}.staged.json"


def drop_staged(local_dir: Path) -> None:
    """Delete a staged checkpoint folder, its marker first: a folder without it is never re-sent."""
    staged_marker(local_dir).unlink(missing_ok=True)
    shutil.rmtree(local_dir, ignore_errors=True)


@dataclass
class UploadJob:
    tag: str  # "step-<N>", also the folder name under the run
    step: int
    local_dir: Path  # this rank's staged files of the checkpoint
    meta: dict[str, Any] = field(default_factory=dict)  # what the manifest records besides the files
    submitted: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    files_total: int = 0
    files_left: int = 0
    bytes_left: int = 0
    last_error: str = ""

    def describe(self) -> str:
        state = (
            f"{self.files_left} of {self.files_total} files, {self.bytes_left / 2**20:.1f} MiB left"
            if self.files_left
            else "waiting for the commit"
        )
        return f"{self.tag} ({state})"


class Uploader:
    """Uploads jobs in order; ``commit`` (rank 0) runs after this rank's part of a job is stored."""

    def __init__(
        self,
        store: Storage,
        *,
        rank: int,
        session: str,
        commit: Callable[[UploadJob], None] | None = None,
        retry_base_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self.store = store
        self.rank = rank
        self.session = session  # parts from an earlier, crashed attempt at the same step are ignored
        self.commit = commit
        self.backoff = Backoff(first_s=retry_base_s, factor=2.0, max_s=retry_max_s)
        self._queue: queue.Queue[UploadJob | None] = queue.Queue()
        self._pending: list[UploadJob] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.committed: list[str] = []  # tags whose job finished (on rank 0: committed)
        # What training does while uploads fail, for the retry lines; the Saver changes it when it waits.
        self.activity = "training goes on"
        self.last_progress = time.monotonic()  # last successful storage call (or start of the current job)
        # Daemon: if the process dies, an unfinished upload is simply never committed.
        self._thread = threading.Thread(target=self._loop, name=f"ckpt-upload-r{rank}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------
    def submit(self, job: UploadJob) -> None:
        files = [p for p in sorted(job.local_dir.rglob("*")) if p.is_file()]
        job.files_total = job.files_left = len(files)
        job.bytes_left = sum(p.stat().st_size for p in files)
        with self._lock:
            self._pending.append(job)
        self._queue.put(job)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> list[UploadJob]:
        with self._lock:
            return list(self._pending)

    def describe_pending(self) -> str:
        jobs = self.pending()
        if not jobs:
            return "nothing pending"
        errors = [j.last_error for j in jobs if j.last_error]
        return "; ".join(j.describe() for j in jobs) + (f"; last error: {errors[-1]}" if errors else "")

    def stalled_s(self) -> float:
        """Seconds without a successful storage call while something is pending; 0 when nothing is pending."""
        return time.monotonic() - self.last_progress if self.pending() else 0.0

    def close(self) -> None:
        """Stop the thread now; whatever is not uploaded stays in the staging folder, uncommitted."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._closing.is_set():
                return
            self.last_progress = time.monotonic()
            try:
                self._run(job)
            except RetryStopped:
                return
            except BaseException:  # noqa: BLE001 - an unexpected bug must not silently stop all uploads
                log.exception(
                    "checkpoint %s: upload thread failed on rank %d; the staged files stay in %s",
                    job.tag,
                    self.rank,
                    job.local_dir,
                )
                return
            with self._lock:
                self._pending.remove(job)
            self.committed.append(job.tag)
            job.done.set()

    def _run(self, job: UploadJob) -> None:
        infos: list[FileInfo] = []
        for path in sorted(p for p in job.local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(job.local_dir).as_posix()
            size = path.stat().st_size
            infos.append(self.retry(lambda p=path, r=rel: self.store.put(p, f"{job.tag}/{r}"), job, f"upload {rel}"))
            job.files_left -= 1
            job.bytes_left -= size
        self.retry(
            lambda: write_part(self.store, job.tag, rank=self.rank, session=self.session, step=job.step, files=infos),
            job,
            "write the part list",
        )
        if self.commit is not None:
            self.retry(lambda: self._commit_when_complete(job), job, "commit")
        drop_staged(job.local_dir)

    def retry(self, fn: Callable[[], Any], job: UploadJob, what: str) -> Any:
        """``fn`` until it succeeds (every failure is retried: dropping a checkpoint is worse), or until
        ``close`` (RetryStopped). Each failure is logged with what is pending and what training does."""

        def note(e: BaseException, failures: int, delay: float) -> None:
            job.last_error = str(e)
            others = [j.tag for j in self.pending() if j is not job]
            log.warning(
                "checkpoint %s: %s failed on rank %d (%s); pending: %s%s; retry %d in %.0f s; %s",
                job.tag,
                what,
                self.rank,
                e,
                job.describe(),
                f", queued after it: {', '.join(others)}" if others else "",
                failures,
                delay,
                self.activity,
            )

        result = retry(
            fn,
            what=f"checkpoint {job.tag}: {what}",
            backoff=self.backoff,
            on_retry=note,
            should_stop=self._closing.is_set,
            sleep=self._closing.wait,
            logger=log,
        )
        job.last_error = ""
        self.last_progress = time.monotonic()
        return result

    def _commit_when_complete(self, job: UploadJob) -> None:
        """Run the commit callback, waiting while it reports other ranks' parts missing (said once a
        minute at most); its other failures go to the caller's retry."""
        noted = [0.0]

        def note(e: BaseException, waits: int, delay: float) -> None:
            if time.monotonic() - noted[0] > 60:
                noted[0] = time.monotonic()
                log.info("checkpoint %s: waiting for rank(s) %s to finish uploading", job.tag, e)

        commit = self.commit
        assert commit is not None
        retry(
            lambda: commit(job),
            what=f"checkpoint {job.tag}: commit",
            backoff=_PARTS_WAIT,
            retryable=lambda e: isinstance(e, PartsMissing),
            should_stop=self._closing.is_set,
            sleep=self._closing.wait,
            on_retry=note,
            log_recovery=False,
            logger=log,
        )
