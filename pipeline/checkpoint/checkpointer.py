"""Checkpoints on any storage: atomic, verified, uploaded in the background, resumed exactly.

The storage layout is ``layout``'s. Saving: every rank takes part in DeepSpeed's ``save_checkpoint``
into its own node-local staging folder; training then goes on while ``upload.Uploader`` copies the
files out. Rank 0 writes the manifest once every rank's part is stored, moves ``latest``, and applies
retention. A crash at any point leaves ``latest`` on the previous committed checkpoint; a half-uploaded
step has no manifest.

Resuming: the newest committed checkpoint whose files all match the manifest's sizes and sha256 is
loaded; a missing or corrupt file makes resume fall back to the previous one with a warning naming the
file. If ``latest`` exists but nothing verifies, start-up fails instead of silently starting over.
``checkpoint.resume`` (``--resume``) chooses: ``auto`` this run_id's newest committed checkpoint, ``never``
from scratch (the run's committed checkpoints are set aside, not deleted, so two timelines never mix under
one ``latest``), or a checkpoint URI. Each manifest records the model, the flattened config and the global
batch, and a resume refuses (before downloading anything) a checkpoint of another model, at another global
batch (its steps would count other samples), or at the schedule's end (a finished run is not trained further).

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
fails rather than train on unprotected or sit blocked until the scheduler kills it.

A next start of the run (``resume = "auto"``) that sees such staged steps (the same staging folder, e.g.
on a shared filesystem, with every rank's files) uploads and commits them before choosing where to
resume, so it continues from the newest step; steps it cannot see or complete are reported with the
number of steps resuming from the newest committed checkpoint loses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.layout import (
    FORMAT,
    LATEST,
    MANIFEST,
    CheckpointError,
    apply_retention,
    check_model,
    committed_candidates,
    committed_tags,
    config_changes,
    first_good,
    list_steps,
    read_latest,
    read_manifest,
    read_parts,
    set_aside,
    step_of,
    storage_options,
    tag_for,
    verified_file,
    write_part,
)
from pipeline.checkpoint.reshard import load_zero1_resharded
from pipeline.checkpoint.upload import PartsMissing, Uploader, UploadJob, staged_marker
from pipeline.config import CheckpointConfig
from pipeline.core.distributed import all_gather_objects, barrier, broadcast_object, control_group
from pipeline.core.retry import Backoff
from pipeline.core.stop import StopFlag
from pipeline.core.storage import Storage, StorageError

log = logging.getLogger("pipeline.checkpoint")

# Checkpointer.wait's collective poll: quick at first, then once a second.
_WAIT_POLL = Backoff(first_s=0.05, factor=1.5, max_s=1.0)
_BLOCKED_NOTE_S = 30.0  # while training is blocked on storage, repeat the warning this often


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is called on every rank."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        run_id: str,
        rank: int,
        world_size: int,
        config_hash: str,
        staging_dir: str,
        local_rank: int | None = None,
        stop: StopFlag | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        # What every manifest records about the run besides the checkpoint, and what a resume compares: "model"
        # (pipeline.wiring.model_record), "config" (the flattened experiment keys), "global_batch", "batch_size",
        # "grad_accum". Absent keys are neither recorded nor compared.
        self.record = dict(record or {})
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
        self.config_hash = config_hash
        self._opts = storage_options(cfg)
        self.store = Storage(cfg.uri, **self._opts).child(run_id)  # the run folder
        self.staging = Path(staging_dir) / run_id
        # Control collectives on a CPU (gloo) group: cheap, and never on the training stream.
        self._group = control_group()
        # One id per process lifetime, the same on all ranks, so the commit never trusts parts left over
        # by a crashed earlier attempt at the same step.
        self.session = broadcast_object(uuid.uuid4().hex[:12] if rank == 0 else None, group=self._group)
        self._uploader: Uploader | None = None
        self._last_save = time.monotonic()
        self.blocked_s: list[float] = []  # time the training loop spent inside save(), per save
        self.last_saved_step: int | None = None
        self.stop = stop  # heeded while a save waits for uploads and while close waits for commits
        self.stranded: list[str] = []  # steps a stop left in the staging folder, never committed

    # ---------------------------------------------------------------------------------------------
    def check_access(self) -> None:
        """Fail on every rank, before any training step, when storage or staging is unusable."""
        err = ""
        try:
            self.store.check_access()
            self.staging.mkdir(parents=True, exist_ok=True)
        except StorageError as e:
            err = str(e)
        except OSError as e:
            err = (
                f"cannot create the staging folder {self.staging} ({e}); set checkpoint.staging_dir to a "
                f"writable node-local folder"
            )
        errors = [e for e in all_gather_objects(err, group=self._group) if e]
        if errors:
            raise CheckpointError(f"checkpoint storage check failed for checkpoint.uri = {self.cfg.uri!r}: {errors[0]}")

    def should_save(self, step: int) -> bool:
        """Same answer on every rank. Time-based saves follow rank 0's clock, agreed by a broadcast
        every ``time_check_steps`` steps."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        if self.cfg.every_minutes and step % self.cfg.time_check_steps == 0:
            due = time.monotonic() - self._last_save >= 60 * self.cfg.every_minutes if self.rank == 0 else None
            return bool(broadcast_object(due, group=self._group))
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
            return self.store.url(tag)
        save_root = self.staging / f"rank-{self.rank:05d}"
        local = save_root / tag
        staged_marker(local).unlink(missing_ok=True)
        if local.exists():
            shutil.rmtree(local)  # left by a crashed attempt: DeepSpeed would mix old and new files
        engine.save_checkpoint(str(save_root), tag=tag, save_latest=False)
        torch.save(trainer_state, local / f"trainer-rank{self.rank}.pt")
        meta = {
            "format": FORMAT,
            "run_id": self.run_id,
            "tag": tag,
            "step": step,
            "epoch": epoch,
            "config_hash": self.config_hash,
            "world_size": self.world_size,
            "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0,
            "versions": _versions(),
            **self.record,
        }
        # The folder is complete: a later start may upload it if this process never does (see _recover_staged).
        staged_marker(local).write_text(json.dumps({"meta": meta, "session": self.session, "rank": self.rank}))
        uploader.submit(UploadJob(tag=tag, step=step, local_dir=local, meta=meta))
        self._last_save = time.monotonic()
        self.last_saved_step = step
        self.blocked_s.append(self._last_save - t0)
        if outcome == "timed out":
            raise self._blocked_error(uploader)
        if outcome == "stopped":
            if self.rank == 0:
                log.warning(
                    "checkpoint %s written to the staging folder %s only: a stop was requested while training was "
                    "blocked on storage",
                    tag,
                    self.staging,
                )
            return self.store.url(tag)
        if self.rank == 0:
            log.info(
                "checkpoint %s written locally in %.2f s; uploading to %s in the background",
                tag,
                self.blocked_s[-1],
                self.store.url(tag),
            )
        return self.store.url(tag)

    def _ensure_uploader(self) -> Uploader:
        if self._uploader is None:
            self._uploader = Uploader(
                self.store, rank=self.rank, session=self.session, commit=self._commit if self.rank == 0 else None
            )
        return self._uploader

    def _wait_for_room(self, uploader: Uploader, tag: str) -> str:
        """Bound the staged-but-unsent checkpoints (local disk) and never restage a tag still uploading.

        A collective: the ranks poll together (a tiny CPU all-gather), so they leave the wait together and in
        the same way. Returns "room" (the save goes ahead), "stopped" (a stop was requested on some rank) or
        "timed out" (``checkpoint.max_wait_s`` passed); raises when an upload thread has died."""

        def busy() -> list[str]:
            jobs = uploader.pending()
            if len(jobs) < self.cfg.max_pending:
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
                late = time.monotonic() - t0 > self.cfg.max_wait_s
                states = all_gather_objects(
                    (bool(jobs), dead, stopping, late, uploader.describe_pending()), group=self._group
                )
                if not any(s[0] for s in states):
                    return "room"
                if any(s[1] for s in states):
                    dead_ranks = ", ".join(str(r) for r, s in enumerate(states) if s[1])
                    raise CheckpointError(
                        f"the checkpoint upload thread on rank {dead_ranks} has stopped (see the error above); "
                        f"unsent checkpoints stay in {self.staging}"
                    )
                if any(s[2] for s in states):
                    return "stopped"
                if any(s[3] for s in states):
                    return "timed out"
                uploader.activity = "training blocked on storage"
                if self.rank == 0 and time.monotonic() - noted >= _BLOCKED_NOTE_S:
                    noted = time.monotonic()
                    log.warning(
                        "training blocked on storage%s: checkpoint %s waits for earlier uploads to %s "
                        "(checkpoint.max_pending = %d; the run fails after checkpoint.max_wait_s = %.0f s, a stop "
                        "signal ends it now): %s",
                        f" for {noted - t0:.0f} s" if polls else "",
                        tag,
                        self.store.uri,
                        self.cfg.max_pending,
                        self.cfg.max_wait_s,
                        "; ".join(f"rank {r}: {s[4]}" for r, s in enumerate(states) if s[0]),
                    )
                time.sleep(_WAIT_POLL.delay(polls))
                polls += 1
        finally:
            uploader.activity = "training goes on"

    def _blocked_error(self, uploader: Uploader) -> CheckpointError:
        tags = [j.tag for j in uploader.pending()]
        return CheckpointError(
            f"checkpoint storage {self.store.uri} took no checkpoint for checkpoint.max_wait_s = "
            f"{self.cfg.max_wait_s:.0f} s ({uploader.describe_pending()}); steps {', '.join(tags)} never reached it "
            f"and stay in the staging folder {self.staging}; `latest` still names the last committed checkpoint. "
            f"Fix the storage and restart: a start that sees this staging folder uploads them first"
        )

    def _commit(self, job: UploadJob, *, session: str | None = None, world_size: int | None = None) -> None:
        """Rank 0, upload thread: once every rank's part is stored, write the manifest, then ``latest``.
        ``session``/``world_size``: of the process that staged the job (a recovered one), when not this one."""
        session = session or self.session
        parts = {r: p for r, p in read_parts(self.store, job.tag).items() if p.get("session") == session}
        missing = [r for r in range(world_size or self.world_size) if r not in parts]
        if missing:
            raise PartsMissing(", ".join(map(str, missing)))
        files = [f for r in sorted(parts) for f in parts[r]["files"]]
        manifest = {
            **job.meta,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": sorted(files, key=lambda f: f["path"]),
        }
        self.store.write_text(f"{job.tag}/{MANIFEST}", json.dumps(manifest, indent=1))
        self.store.write_text(LATEST, job.tag)
        log.info(
            "checkpoint %s committed (%d files, %.1f MiB) at %s",
            job.tag,
            len(files),
            sum(f["size"] for f in files) / 2**20,
            self.store.url(job.tag),
        )
        try:
            deleted = apply_retention(
                self.store, keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every, newest=job.tag
            )
            if deleted:
                log.info("retention: deleted %s", ", ".join(deleted))
        except StorageError as e:
            log.warning("retention after %s failed (%s); older checkpoints stay until the next commit", job.tag, e)

    # ---------------------------------------------------------------------------------------------
    def pending(self) -> str:
        return self._uploader.describe_pending() if self._uploader else "nothing pending"

    def wait(self, *, timeout_s: float | None = None) -> None:
        """Every rank waits until all its uploads are done and rank 0 has committed them. A collective.

        The ranks poll together once a second (a tiny gloo all-gather) rather than block in one long
        collective, so a slow commit never trips the collective timeout. After a stop request (on any rank),
        uploads that make no progress for ``checkpoint.stop_wait_s`` on every busy rank are given up: the
        steps stay staged, are listed in ``stranded`` and named in a warning, and the wait returns."""
        timeout_s = 60 * self.cfg.close_timeout_min if timeout_s is None else timeout_s
        t0 = time.monotonic()
        last_note = t0
        polls = 0
        if self._uploader is not None:
            self._uploader.activity = "the run waits for its commits before it exits"
        while True:
            jobs = self._uploader.pending() if self._uploader is not None else []
            idle = not jobs
            dead = self._uploader is not None and not idle and not self._uploader.alive
            give_up = time.monotonic() - t0 > timeout_s or dead
            stopping = self.stop is not None and self.stop.is_set
            stalled = self._uploader is not None and self._uploader.stalled_s() > self.cfg.stop_wait_s
            states = all_gather_objects(
                (idle, give_up, self.pending(), dead, stopping, stalled, [j.tag for j in jobs]), group=self._group
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
                        f"checkpoint and the unsent files are kept in {self.staging}; check the storage and resume"
                    )
                raise CheckpointError(
                    f"checkpoint upload to {self.store.uri} did not finish within {timeout_s / 60:.1f} min "
                    f"({'; '.join(busy)}); `latest` still names the previous committed checkpoint and the "
                    f"unsent files are kept in {self.staging}; check the storage and resume"
                )
            if self.rank == 0 and time.monotonic() - last_note > 30:
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
        if self.rank != 0:
            return
        committed = self._uploader.committed if self._uploader is not None else []
        log.warning(
            "stop requested while checkpoint storage %s made no progress for checkpoint.stop_wait_s = %.0f s (%s): "
            "steps %s never reached the store; they stay in the staging folder %s (rank-*/step-*), and a start "
            "that sees this folder uploads them before resuming; otherwise the run resumes from %s",
            self.store.uri,
            self.cfg.stop_wait_s,
            "; ".join(f"rank {r}: {s[2]}" for r, s in enumerate(states) if not s[0]),
            ", ".join(tags),
            self.staging,
            f"{committed[-1]}, its last committed checkpoint" if committed else "the last committed checkpoint",
        )

    def close(self) -> None:
        """Wait for every pending checkpoint to be committed, then stop the upload thread."""
        if self._uploader is None:
            return
        try:
            self.wait()
        finally:
            self._uploader.close()
            self._uploader = None

    # ---------------------------------------------------------------------------------------------
    def resume(self, engine: Any, *, end_step: int | None = None) -> dict[str, Any] | None:
        """Load the checkpoint chosen by ``checkpoint.resume``; returns this rank's trainer state, or None when
        the run starts from scratch. A collective. Rank 0's first line says which checkpoint and step the run
        starts from, or that it starts from scratch.

        Refused, on every rank alike and before anything is downloaded or written (CheckpointError): a
        checkpoint of another model (the manifest's record), at another global batch (steps would count other
        samples), or at or past ``end_step`` (the schedule's end: the run is finished)."""
        mode = self.cfg.resume
        if mode == "never":
            if self.rank == 0 and not self._set_aside_all():  # which logs that the run starts from scratch
                log.info("run %s starts from scratch (checkpoint.resume = never)", self.run_id)
            barrier(group=self._group)
            return None
        survey = broadcast_object(self._survey(mode) if self.rank == 0 else None, group=self._group)
        if isinstance(survey, str):
            raise CheckpointError(survey)
        store = Storage(survey["root"], **self._opts)
        if not survey["candidates"]:
            if self.rank == 0:
                log.info("run %s starts from scratch: no committed checkpoint at %s", self.run_id, store.uri)
            return None
        # Every rank holds the same manifests (rank 0's survey) and the same config: the same verdict, no collective.
        newest = survey["candidates"][0]
        self._accept(store, *newest, own_run=survey["own_run"], end_step=end_step)

        def check(tag: str, manifest: dict[str, Any]) -> None:
            # One download per node; a tag any rank cannot use is rejected on every rank.
            err = self._fetch(store, tag, manifest) if self.local_rank == 0 else ""
            errors = [e for e in all_gather_objects(err, group=self._group) if e]
            if errors:
                raise CheckpointError(errors[0])

        chosen, rejected = first_good(store, survey["candidates"], check, announce=self.rank == 0)
        if chosen is None:
            raise CheckpointError(
                f"no checkpoint of {store.uri} passed verification (tried {', '.join(t for t, _ in rejected)}; see "
                f"the warnings above for each file); refusing to start from scratch: fix or remove them, point "
                f"checkpoint.resume at a good checkpoint URI, or pass --checkpoint.resume=never"
            )
        tag, manifest = chosen
        if tag != newest[0]:
            self._accept(store, tag, manifest, own_run=survey["own_run"], end_step=end_step)
        if self.rank == 0:
            log.info(
                "resumed run %s at step %d (epoch %d) from %s, written by %d ranks",
                self.run_id,
                manifest["step"],
                manifest["epoch"],
                store.url(tag),
                manifest["world_size"],
            )
            changes = config_changes(manifest, config=self.record.get("config"), config_hash=self.config_hash)
            if changes:
                log.warning("the config differs from the one that wrote %s (%s)", tag, changes)
        state = self._load(engine, tag, manifest)
        if self.rank == 0 and survey["own_run"]:
            self._after_resume(store, tag, [t for t, _ in rejected])
        barrier(group=self._group)
        shutil.rmtree(self._restore_root(), ignore_errors=True)
        return state

    def _accept(
        self, store: Storage, tag: str, manifest: dict[str, Any], *, own_run: bool, end_step: int | None
    ) -> None:
        """Raise CheckpointError when this run must not continue from ``tag`` (see ``resume``)."""
        url = store.url(tag)
        new = "start a new run (--run_id=<new id>) or start this one over (--resume=never)"
        if "model" in self.record:
            recorded = manifest.get("model")
            name = recorded.get("name") if isinstance(recorded, dict) else None
            check_model(
                manifest,
                url=url,
                model=self.record["model"],
                fix=f"resume with the config that wrote it (model.name = {name!r}), or {new}",
            )
        old, now = manifest.get("global_batch"), self.record.get("global_batch")
        if old is not None and now is not None and int(old) != int(now):
            ranks, batch, accum = self.world_size, self.record.get("batch_size"), self.record.get("grad_accum")
            keep = []
            if batch and old % (ranks * batch) == 0:
                keep.append(f"--distributed.grad_accum={old // (ranks * batch)}")
            if accum and old % (ranks * accum) == 0:
                keep.append(f"--data.batch_size={old // (ranks * accum)}")
            raise CheckpointError(
                f"checkpoint {url} was written at a global batch of {old} images per step ({manifest['world_size']} "
                f"ranks x data.batch_size {manifest.get('batch_size')} x distributed.grad_accum "
                f"{manifest.get('grad_accum')}), this run's is {now} ({ranks} x {batch} x {accum}): its steps, "
                f"epochs and lr milestones would count other samples. Keep the global batch on {ranks} ranks "
                f"({' or '.join(keep) or f'data.batch_size x distributed.grad_accum = {old / ranks:g}'}), or {new}"
            )
        if end_step is not None and int(manifest["step"]) >= end_step:
            if own_run:
                raise CheckpointError(
                    f"run {self.run_id} is finished: its newest committed checkpoint {url} is at step "
                    f"{manifest['step']}, {'the' if int(manifest['step']) == end_step else 'past the'} end of its "
                    f"schedule ({end_step} steps); to train again, {new}"
                )
            raise CheckpointError(
                f"checkpoint.resume = {self.cfg.resume!r}: {url} is at step {manifest['step']}, at or past the end "
                f"of this schedule ({end_step} steps): nothing is left to train; lengthen the schedule "
                f"(schedule.epochs or schedule.max_steps) or resume from an earlier checkpoint"
            )

    def _survey(self, mode: str) -> dict[str, Any] | str:
        """Rank 0: the candidates to try, newest first, or an error message for every rank to raise."""
        try:
            if mode == "auto":
                store, own = self.store, True
                self._recover_staged()
            else:
                store, own = Storage(mode, **self._opts), False
                if store.exists(MANIFEST):  # a step folder itself
                    tag = store.uri.rstrip("/").rsplit("/", 1)[1]
                    parent = Storage(store.uri.rsplit("/", 1)[0], **self._opts)
                    manifest = read_manifest(parent, tag)
                    return {"root": parent.uri, "own_run": False, "candidates": [(tag, manifest)]}
                if not store.exists(LATEST) and not list_steps(store):
                    return (
                        f"checkpoint.resume = {mode!r} holds no checkpoint (no {MANIFEST}, no {LATEST}, no "
                        f"step-* folders); give a run folder or a step folder"
                    )
            try:
                candidates = committed_candidates(store)
            except CheckpointError as e:  # `latest` exists but nothing is committed
                return (
                    f"{e}; refusing to start from scratch: restore the checkpoint, point checkpoint.resume "
                    f"at one, or pass --checkpoint.resume=never"
                )
            return {"root": store.uri, "own_run": own, "candidates": candidates}
        except (StorageError, CheckpointError) as e:
            return f"cannot read checkpoints for resume ({e})"

    def _recover_staged(self) -> None:
        """Rank 0, before choosing where to resume its own run: upload and commit the steps an earlier process
        of this run left complete in the staging folder (a stop while the store was down, a crash before the
        upload ended), oldest first so ``latest`` ends on the newest. Steps not newer than the newest committed
        one are dropped; steps it cannot complete from here, and uncommitted ones on the store that it cannot
        see at all, are named with the number of steps the resume loses."""
        staged: dict[tuple[str, str], dict[int, tuple[Path, dict[str, Any]]]] = {}
        for marker in sorted(self.staging.glob("rank-*/step-*.staged.json")):
            try:
                info = json.loads(marker.read_text())
                key = (str(info["meta"]["tag"]), str(info["session"]))
                staged.setdefault(key, {})[int(info["rank"])] = (marker.parent / key[0], info["meta"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring the unreadable staging marker %s (%s)", marker, e)
        committed = committed_tags(self.store)
        newest = step_of(committed[0]) or 0 if committed else -1
        lost: dict[int, str] = {}  # step: why it cannot be committed from here
        incomplete: dict[int, list[Path]] = {}
        for (tag, session), ranks in sorted(staged.items(), key=lambda kv: step_of(kv[0][0]) or 0):
            step, meta = step_of(tag) or 0, next(iter(ranks.values()))[1]
            missing = [r for r in range(int(meta["world_size"])) if r not in ranks or not ranks[r][0].is_dir()]
            if step <= newest:
                for local, _ in ranks.values():
                    _drop_staged(local)  # the store already holds this step or a newer one
                continue
            if missing:
                lost[step] = (
                    f"{tag} (in {self.staging} without the files of rank(s) {', '.join(map(str, missing))}: "
                    f"node-local staging on another node?)"
                )
                incomplete[step] = [local for local, _ in ranks.values()]
                continue
            log.warning(
                "checkpoint %s of run %s never reached %s: uploading it from the staging folder %s before resuming",
                tag,
                self.run_id,
                self.store.uri,
                self.staging,
            )
            try:
                for r, (local, _) in sorted(ranks.items()):
                    files = sorted(p for p in local.rglob("*") if p.is_file())
                    infos = [self.store.put(p, f"{tag}/{p.relative_to(local).as_posix()}") for p in files]
                    write_part(self.store, tag, rank=r, session=session, step=step, files=infos)
                job = UploadJob(tag=tag, step=step, local_dir=ranks[0][0], meta=meta)
                self._commit(job, session=session, world_size=int(meta["world_size"]))
            except (StorageError, PartsMissing) as e:
                raise CheckpointError(
                    f"cannot upload {tag}, left in the staging folder {self.staging} by an earlier process, to "
                    f"{self.store.uri} ({e}); fix the storage and restart, or pass --checkpoint.resume=never"
                ) from e
            for local, _ in ranks.values():
                _drop_staged(local)
            newest = step
        for step, locals_ in incomplete.items():
            if step < newest:  # a newer step was recovered: this one is not needed any more
                lost.pop(step)
                for local in locals_:
                    _drop_staged(local)
        for t in list_steps(self.store):
            step = step_of(t) or 0
            if step > newest and step not in lost and not any(n.startswith("manifest") for n in self.store.list(t)):
                lost[step] = f"{t} (partly on the store, its staged files not in {self.staging})"
        if lost:
            log.warning(
                "never committed, and not recoverable from this start: %s; resuming from the newest committed "
                "checkpoint (%s) loses %d steps",
                "; ".join(lost[k] for k in sorted(lost)),
                tag_for(newest) if newest >= 0 else "none: training starts from scratch",
                max(lost) - max(newest, 0),
            )

    def _restore_root(self) -> Path:
        # Per host, so a staging folder on a shared filesystem still gets one copy per node.
        return self.staging / f"restore-{socket.gethostname()}"

    def _fetch(self, store: Storage, tag: str, manifest: dict[str, Any]) -> str:
        """Node leader: download every file of ``tag`` and check size and sha256; "" when all match."""
        root = self._restore_root()
        shutil.rmtree(root, ignore_errors=True)
        for f in manifest["files"]:
            rel = f"{tag}/{f['path']}"
            try:
                verified_file(store, rel, root / rel, f)
            except CheckpointError as e:
                return str(e)
        return ""

    def _load(self, engine: Any, tag: str, manifest: dict[str, Any]) -> dict[str, Any]:
        root = self._restore_root()
        old_world = int(manifest["world_size"])
        try:
            if old_world != self.world_size and int(manifest.get("zero_stage", 0)) >= 1:
                load_zero1_resharded(engine, root, tag, old_world=old_world, new_world=self.world_size)
            else:
                path, _ = engine.load_checkpoint(str(root), tag=tag)
                if path is None:
                    raise CheckpointError(f"DeepSpeed found no checkpoint in {root / tag}")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a verified checkpoint that does not load is a config mismatch
            raise CheckpointError(
                f"checkpoint {self.store.url(tag)} passed verification but DeepSpeed cannot load it ({e}); was "
                f"it written for another model or ZeRO stage? (config hash {manifest.get('config_hash')}, now "
                f"{self.config_hash})"
            ) from e
        # A rank that did not exist in the old run takes rank 0's file: only its shared part is used.
        own = root / tag / f"trainer-rank{self.rank}.pt"
        return torch.load(own if self.rank < old_world else root / tag / "trainer-rank0.pt", weights_only=False)

    def _after_resume(self, store: Storage, tag: str, rejected: list[str]) -> None:
        """Rank 0: checkpoints newer than the one resumed belong to an abandoned timeline; uncommit them
        (manifest renamed, files kept) so a later resume never prefers them, and point ``latest`` here."""
        step = step_of(tag) or 0
        try:
            for t in committed_tags(store):
                if (step_of(t) or 0) > step:
                    set_aside(store, t, "rejected" if t in rejected else "abandoned")
                    log.warning(
                        "set aside %s (%s): the run continues from %s",
                        store.url(t),
                        "failed verification" if t in rejected else "newer than the resumed checkpoint",
                        tag,
                    )
            if read_latest(store)[0] != tag:  # also mends a `latest` that is missing or damaged
                store.write_text(LATEST, tag)
        except StorageError as e:
            log.warning("could not tidy %s after resuming (%s)", store.uri, e)

    def _set_aside_all(self) -> int:
        """Rank 0, checkpoint.resume = never: uncommit every committed checkpoint of the run; returns how many."""
        try:
            tags = committed_tags(self.store)
            for t in tags:
                set_aside(self.store, t, "set-aside")
            self.store.delete(LATEST)
            if tags:
                log.warning(
                    "run %s starts from scratch (checkpoint.resume = never): its %d committed checkpoints at %s "
                    "were set aside (manifest.json renamed to manifest.set-aside.json)",
                    self.run_id,
                    len(tags),
                    self.store.uri,
                )
            return len(tags)
        except StorageError as e:
            raise CheckpointError(f"checkpoint.resume = never: cannot set aside the old checkpoints ({e})") from e


def _drop_staged(local: Path) -> None:
    staged_marker(local).unlink(missing_ok=True)
    shutil.rmtree(local, ignore_errors=True)


def _versions() -> dict[str, str]:
    import deepspeed

    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__}
