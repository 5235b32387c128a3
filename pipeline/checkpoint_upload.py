"""Background upload of staged checkpoint files, one thread per rank, retried with backoff.

Training only waits for the local write; this thread copies each finished checkpoint folder to object
storage in save order, then writes this rank's *part* (a small JSON listing its files with size and
sha256). On global rank 0 a commit callback then waits for every rank's part and writes the manifest
and the ``latest`` marker. No collective call happens here: a collective from a second thread would race
the training loop's own collectives, so ranks coordinate through the storage instead.

A failing upload (endpoint down, throttling) is retried forever with exponential backoff while training
goes on; the local files are deleted only after the upload succeeded, so nothing is lost. The owner
bounds how many checkpoints may wait (``Checkpointer`` blocks a new save when too many are pending).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.storage import FileInfo, Storage, StorageError

log = logging.getLogger("pipeline.checkpoint")

PARTS_DIR = "parts"


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
        state = (f"{self.files_left} of {self.files_total} files, {self.bytes_left / 2**20:.1f} MiB left"
                 if self.files_left else "waiting for the commit")
        return f"{self.tag} ({state})"


class Uploader:
    """Uploads jobs in order; ``commit`` (rank 0) runs after this rank's part of a job is stored."""

    def __init__(self, store: Storage, *, rank: int, session: str,
                 commit: Callable[[UploadJob], None] | None = None,
                 retry_base_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.store = store
        self.rank = rank
        self.session = session  # parts from an earlier, crashed attempt at the same step are ignored
        self.commit = commit
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._queue: queue.Queue[UploadJob | None] = queue.Queue()
        self._pending: list[UploadJob] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.committed: list[str] = []  # tags whose job finished (on rank 0: committed)
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
            try:
                self._run(job)
            except _Closing:
                return
            except BaseException:  # noqa: BLE001 - an unexpected bug must not silently stop all uploads
                log.exception("checkpoint %s: upload thread failed on rank %d; the staged files stay in %s",
                              job.tag, self.rank, job.local_dir)
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
            infos.append(self.retry(lambda: self.store.put(path, f"{job.tag}/{rel}"), job, f"upload {rel}"))
            job.files_left -= 1
            job.bytes_left -= size
        part = {"rank": self.rank, "session": self.session, "step": job.step,
                "files": [{**asdict(i), "path": i.path.split("/", 1)[1], "rank": self.rank} for i in infos]}
        self.retry(lambda: self.store.write_text(f"{job.tag}/{PARTS_DIR}/rank-{self.rank:05d}.json",
                                                 json.dumps(part)), job, "write the part list")
        if self.commit is not None:
            self.retry(lambda: self.commit(job), job, "commit")
        shutil.rmtree(job.local_dir, ignore_errors=True)

    def retry(self, fn: Callable[[], Any], job: UploadJob, what: str) -> Any:
        failures = waits = 0
        noted = 0.0
        while True:
            if self._closing.is_set():
                raise _Closing()
            try:
                result = fn()
                if failures:
                    log.warning("checkpoint %s: %s succeeded after %d retries", job.tag, what, failures)
                job.last_error = ""
                return result
            except PartsMissing as e:
                # Other ranks are still uploading: a wait, not a failure; said once a minute at most.
                if time.monotonic() - noted > 60:
                    noted = time.monotonic()
                    log.info("checkpoint %s: waiting for rank(s) %s to finish uploading", job.tag, e)
                waits += 1
                delay = min(2.0, 0.05 * 1.5**waits)
            except Exception as e:  # noqa: BLE001 - every failure is retried: dropping a checkpoint is worse
                delay = min(self.retry_max_s, self.retry_base_s * 2**failures)
                failures += 1
                job.last_error = str(e)
                others = [j.tag for j in self.pending() if j is not job]
                log.warning("checkpoint %s: %s failed on rank %d (%s); pending: %s%s; retry %d in %.0f s; "
                            "training goes on", job.tag, what, self.rank, e, job.describe(),
                            f", queued after it: {', '.join(others)}" if others else "", failures, delay)
            if self._closing.wait(delay):
                raise _Closing()


class _Closing(Exception):
    pass


class PartsMissing(Exception):
    """Raised by a commit callback while some ranks' parts are not stored yet (the message lists them)."""


def read_parts(store: Storage, tag: str) -> dict[int, dict[str, Any]]:
    """The part lists stored so far for ``tag``, by rank (unreadable ones are skipped: not yet whole)."""
    out: dict[int, dict[str, Any]] = {}
    for name in store.list(f"{tag}/{PARTS_DIR}"):
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            part = json.loads(store.read_text(f"{tag}/{PARTS_DIR}/{name}"))
        except ValueError:
            continue
        except StorageError as e:
            if e.kind == "not_found":
                continue
            raise
        out[int(part["rank"])] = part
    return out
