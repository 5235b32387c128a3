"""The save path (``Saver``): stage each rank's share, upload it in the background, commit, wait for commits.

Every rank takes part in DeepSpeed's ``save_checkpoint`` into its own node-local staging folder; training
then goes on while ``upload.Uploader`` copies the files out. Rank 0 writes the manifest once every rank's
part is stored, moves ``latest``, and applies retention (``layout.commit``). A crash at any point leaves
``latest`` on the previous committed checkpoint; a half-uploaded step has no manifest.

Stop requests: the trainer agrees on a stop flag across ranks at its metric reduction (every
``log_every`` steps), saves through ``save`` and ``close`` waits for the commit before the process
exits with the requeue code.

A store that stays down: the uploads retry forever in the background, but at most ``max_pending`` saves
may wait; the next save then blocks ("training blocked on storage"), polling the stop flag with the other
ranks, for at most ``max_wait_s``. A stop request ends the wait: the step is written to the staging folder
anyway and the run stops; ``close`` then gives up on commits that make no progress for ``stop_wait_s`` and
names the steps that never reached the store and the staging folder that holds them (``stranded``), so the
process still exits promptly with the stop code. Without a stop, ``max_wait_s`` ends the wait with a
CheckpointError naming the URI and the staged steps (the step is staged first): a run that cannot save
fails rather than train on unprotected or sit blocked until the scheduler kills it. A next start uploads
such staged steps before it resumes (``resume``).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from typing import Any

import torch

from pipeline.checkpoint.context import RunContext
from pipeline.checkpoint.layout import FORMAT, CheckpointError, commit, step_of, tag_for
from pipeline.checkpoint.upload import Uploader, UploadJob, staged_marker
from pipeline.core.distributed import all_gather_objects, broadcast_object
from pipeline.core.retry import Backoff
from pipeline.core.stop import StopFlag

log = logging.getLogger("pipeline.checkpoint")

# Saver.wait's collective poll: quick at first, then once a second.
_WAIT_POLL = Backoff(first_s=0.05, factor=1.5, max_s=1.0)
_BLOCKED_NOTE_S = 30.0  # while training is blocked on storage, repeat the warning this often


class Saver:
    """The save side of one run's ``Checkpointer``; every method is called on every rank."""

    def __init__(self, ctx: RunContext, *, stop: StopFlag | None = None) -> None:
        self.ctx = ctx
        self.stop = stop  # heeded while a save waits for uploads and while close waits for commits
        self.uploader: Uploader | None = None  # started by the first save
        self._last_save = time.monotonic()
        self.blocked_s: list[float] = []  # time the training loop spent inside save(), per save
        self.last_saved_step: int | None = None
        self.stranded: list[str] = []  # steps a stop left in the staging folder, never committed

    def should_save(self, step: int) -> bool:
        """Same answer on every rank. Time-based saves follow rank 0's clock, agreed by a broadcast
        every ``time_check_steps`` steps."""
        cfg = self.ctx.cfg
        if cfg.every_steps and step % cfg.every_steps == 0:
            return True
        if cfg.every_minutes and step % cfg.time_check_steps == 0:
            due = time.monotonic() - self._last_save >= 60 * cfg.every_minutes if self.ctx.rank == 0 else None
            return bool(broadcast_object(due, group=self.ctx.group))
        return False

    # ---------------------------------------------------------------------------------------------
    def save(self, engine: Any, *, step: int, epoch: int, trainer_state: dict[str, Any]) -> str:
        """Write this rank's share locally (a collective with DeepSpeed) and queue the upload.
        Returns the checkpoint's URI; it is committed later (``close`` waits for that)."""
        t0 = time.monotonic()
        tag = tag_for(step)
        uploader = self._ensure_uploader()
        outcome = self._wait_for_room(uploader, tag)
        if outcome != "room" and any(j.tag == tag for j in uploader.pending()):
            # Stopping or failing while this very step still uploads from its staged folder: it is staged.
            if outcome == "timed out":
                raise self._blocked_error(uploader)
            return self.ctx.store.url(tag)
        save_root = self.ctx.staging / f"rank-{self.ctx.rank:05d}"
        local = save_root / tag
        staged_marker(local).unlink(missing_ok=True)
        if local.exists():
            shutil.rmtree(local)  # left by a crashed attempt: DeepSpeed would mix old and new files
        engine.save_checkpoint(str(save_root), tag=tag, save_latest=False)
        torch.save(trainer_state, local / f"trainer-rank{self.ctx.rank}.pt")
        meta = {
            "format": FORMAT,
            "run_id": self.ctx.run_id,
            "tag": tag,
            "step": step,
            "epoch": epoch,
            "config_hash": self.ctx.config_hash,
            "world_size": self.ctx.world_size,
            "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0,
            "versions": _versions(),
            **self.ctx.record,
        }
        # The folder is complete: a later start may upload it if this process never does (see resume.Resumer).
        staged_marker(local).write_text(json.dumps({"meta": meta, "session": self.ctx.session, "rank": self.ctx.rank}))
        uploader.submit(UploadJob(tag=tag, step=step, local_dir=local, meta=meta))
        self._last_save = time.monotonic()
        self.last_saved_step = step
        self.blocked_s.append(self._last_save - t0)
        if outcome == "timed out":
            raise self._blocked_error(uploader)
        if outcome == "stopped":
            if self.ctx.rank == 0:
                log.warning(
                    "checkpoint %s written to the staging folder %s only: a stop was requested while training was "
                    "blocked on storage",
                    tag,
                    self.ctx.staging,
                )
            return self.ctx.store.url(tag)
        if self.ctx.rank == 0:
            log.info(
                "checkpoint %s written locally in %.2f s; uploading to %s in the background",
                tag,
                self.blocked_s[-1],
                self.ctx.store.url(tag),
            )
        return self.ctx.store.url(tag)

    def _ensure_uploader(self) -> Uploader:
        if self.uploader is None:
            self.uploader = Uploader(
                self.ctx.store,
                rank=self.ctx.rank,
                session=self.ctx.session,
                commit=self._commit if self.ctx.rank == 0 else None,
            )
        return self.uploader

    def _wait_for_room(self, uploader: Uploader, tag: str) -> str:
        """Bound the staged-but-unsent checkpoints (local disk) and never restage a tag still uploading.

        A collective: the ranks poll together (a tiny CPU all-gather), so they leave the wait together and in
        the same way. Returns "room" (the save goes ahead), "stopped" (a stop was requested on some rank) or
        "timed out" (``checkpoint.max_wait_s`` passed); raises when an upload thread has died."""

        def busy() -> list[str]:
            jobs = uploader.pending()
            if len(jobs) < self.ctx.cfg.max_pending:
                jobs = [j for j in jobs if j.tag == tag]
            return [j.tag for j in jobs]

        t0 = time.monotonic()
        noted = 0.0
        polls = 0
        try:
            while True:
                jobs = busy()
                dead = bool(jobs) and not uploader.alive
                stopping = self.stop is not None and self.stop.is_set
                late = time.monotonic() - t0 > self.ctx.cfg.max_wait_s
                states = all_gather_objects(
                    (bool(jobs), dead, stopping, late, uploader.describe_pending()), group=self.ctx.group
                )
                if not any(s[0] for s in states):
                    return "room"
                if any(s[1] for s in states):
                    dead_ranks = ", ".join(str(r) for r, s in enumerate(states) if s[1])
                    raise CheckpointError(
                        f"the checkpoint upload thread on rank {dead_ranks} has stopped (see the error above); "
                        f"unsent checkpoints stay in {self.ctx.staging}"
                    )
                if any(s[2] for s in states):
                    return "stopped"
                if any(s[3] for s in states):
                    return "timed out"
                uploader.activity = "training blocked on storage"
                if self.ctx.rank == 0 and time.monotonic() - noted >= _BLOCKED_NOTE_S:
                    noted = time.monotonic()
                    log.warning(
                        "training blocked on storage%s: checkpoint %s waits for earlier uploads to %s "
                        "(checkpoint.max_pending = %d; the run fails after checkpoint.max_wait_s = %.0f s, a stop "
                        "signal ends it now): %s",
                        f" for {noted - t0:.0f} s" if polls else "",
                        tag,
                        self.ctx.store.uri,
                        self.ctx.cfg.max_pending,
                        self.ctx.cfg.max_wait_s,
                        "; ".join(f"rank {r}: {s[4]}" for r, s in enumerate(states) if s[0]),
                    )
                time.sleep(_WAIT_POLL.delay(polls))
                polls += 1
        finally:
            uploader.activity = "training goes on"

    def _blocked_error(self, uploader: Uploader) -> CheckpointError:
        tags = [j.tag for j in uploader.pending()]
        return CheckpointError(
            f"checkpoint storage {self.ctx.store.uri} took no checkpoint for checkpoint.max_wait_s = "
            f"{self.ctx.cfg.max_wait_s:.0f} s ({uploader.describe_pending()}); steps {', '.join(tags)} never reached it "
            f"and stay in the staging folder {self.ctx.staging}; `latest` still names the last committed checkpoint. "
            f"Fix the storage and restart: a start that sees this staging folder uploads them first"
        )

    def _commit(self, job: UploadJob) -> None:
        """Rank 0, upload thread: commit ``job`` once every rank's part of this session is stored."""
        cfg = self.ctx.cfg
        commit(
            self.ctx.store,
            job.tag,
            meta=job.meta,
            session=self.ctx.session,
            world_size=self.ctx.world_size,
            keep_last=cfg.keep_last,
            keep_every=cfg.keep_every,
        )

    # ---------------------------------------------------------------------------------------------
    def pending(self) -> str:
        return self.uploader.describe_pending() if self.uploader else "nothing pending"

    def wait(self, *, timeout_s: float | None = None) -> None:
        """Every rank waits until all its uploads are done and rank 0 has committed them. A collective.

        The ranks poll together once a second (a tiny gloo all-gather) rather than block in one long
        collective, so a slow commit never trips the collective timeout. After a stop request (on any rank),
        uploads that make no progress for ``checkpoint.stop_wait_s`` on every busy rank are given up: the
        steps stay staged, are listed in ``stranded`` and named in a warning, and the wait returns."""
        timeout_s = 60 * self.ctx.cfg.close_timeout_min if timeout_s is None else timeout_s
        t0 = time.monotonic()
        last_note = t0
        polls = 0
        if self.uploader is not None:
            self.uploader.activity = "the run waits for its commits before it exits"
        while True:
            jobs = self.uploader.pending() if self.uploader is not None else []
            idle = not jobs
            dead = self.uploader is not None and not idle and not self.uploader.alive
            give_up = time.monotonic() - t0 > timeout_s or dead
            stopping = self.stop is not None and self.stop.is_set
            stalled = self.uploader is not None and self.uploader.stalled_s() > self.ctx.cfg.stop_wait_s
            states = all_gather_objects(
                (idle, give_up, self.pending(), dead, stopping, stalled, [j.tag for j in jobs]), group=self.ctx.group
            )
            if all(s[0] for s in states):
                return
            if any(s[4] for s in states) and all(s[5] for s in states if not s[0]):
                self._strand(sorted({t for s in states for t in s[6]}, key=lambda t: step_of(t) or 0), states)
                return
            if any(s[1] for s in states):
                busy = [f"rank {r}: {s[2]}" for r, s in enumerate(states) if not s[0]]
                stopped = [r for r, s in enumerate(states) if s[3]]
                if stopped:
                    raise CheckpointError(
                        f"the checkpoint upload thread on rank {', '.join(map(str, stopped))} has stopped (see the "
                        f"error logged above; {'; '.join(busy)}); `latest` still names the previous committed "
                        f"checkpoint and the unsent files are kept in {self.ctx.staging}; check the storage and resume"
                    )
                raise CheckpointError(
                    f"checkpoint upload to {self.ctx.store.uri} did not finish within {timeout_s / 60:.1f} min "
                    f"({'; '.join(busy)}); `latest` still names the previous committed checkpoint and the "
                    f"unsent files are kept in {self.ctx.staging}; check the storage and resume"
                )
            if self.ctx.rank == 0 and time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                log.warning(
                    "waiting for checkpoint uploads to commit: %s",
                    "; ".join(f"rank {r}: {s[2]}" for r, s in enumerate(states) if not s[0]),
                )
            time.sleep(_WAIT_POLL.delay(polls))
            polls += 1

    def _strand(self, tags: list[str], states: list[Any]) -> None:
        """A stop while the store makes no progress: leave ``tags`` staged and say where they are."""
        self.stranded = tags
        if self.ctx.rank != 0:
            return
        committed = self.uploader.committed if self.uploader is not None else []
        log.warning(
            "stop requested while checkpoint storage %s made no progress for checkpoint.stop_wait_s = %.0f s (%s): "
            "steps %s never reached the store; they stay in the staging folder %s (rank-*/step-*), and a start "
            "that sees this folder uploads them before resuming; otherwise the run resumes from %s",
            self.ctx.store.uri,
            self.ctx.cfg.stop_wait_s,
            "; ".join(f"rank {r}: {s[2]}" for r, s in enumerate(states) if not s[0]),
            ", ".join(tags),
            self.ctx.staging,
            f"{committed[-1]}, its last committed checkpoint" if committed else "the last committed checkpoint",
        )

    def close(self) -> None:
        """Wait for every pending checkpoint to be committed, then stop the upload thread."""
        if self.uploader is None:
            return
        try:
            self.wait()
        finally:
            self.uploader.close()
            self.uploader = None


def _versions() -> dict[str, str]:
    import deepspeed  # heavy: only a save's manifest record needs its version

    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__}
