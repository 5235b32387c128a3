"""The resume path (``Resumer``): choose, verify and load the checkpoint a run continues from.

The newest committed checkpoint whose files all match the manifest's sizes and sha256 is loaded; a missing
or corrupt file makes resume fall back to the previous one with a warning naming the file. If ``latest``
exists but nothing verifies, start-up fails instead of silently starting over. ``checkpoint.resume``
(``--resume``) chooses: ``auto`` this run_id's newest committed checkpoint, ``never`` from scratch (the run's
committed checkpoints are set aside, not deleted, so two timelines never mix under one ``latest``), or a
checkpoint URI. Each manifest records the model, the flattened config and the global batch, and a resume
refuses (before downloading anything) a checkpoint of another model, at another global batch (its steps
would count other samples), or at the schedule's end (a finished run is not trained further).

A next start of the run (``resume = "auto"``) that sees steps an earlier process left staged (``save``: the
same staging folder, e.g. on a shared filesystem, with every rank's files) uploads and commits them before
choosing where to resume, so it continues from the newest step; steps it cannot see or complete are
reported with the number of steps resuming from the newest committed checkpoint loses.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.context import RunContext
from pipeline.checkpoint.layout import (
    LATEST,
    MANIFEST,
    CheckpointError,
    PartsMissing,
    check_model,
    commit,
    committed_candidates,
    committed_tags,
    config_changes,
    first_good,
    list_steps,
    read_latest,
    read_manifest,
    set_aside,
    step_of,
    tag_for,
    verified_file,
    write_part,
)
from pipeline.checkpoint.reshard import load_zero1_resharded
from pipeline.checkpoint.upload import drop_staged
from pipeline.core.distributed import all_gather_objects, barrier, broadcast_object
from pipeline.core.storage import Storage, StorageError

log = logging.getLogger("pipeline.checkpoint")


@dataclass
class StagedStep:
    """A step an earlier process of the run left complete in the staging folder (its markers say so)."""

    tag: str
    session: str  # of the process that staged it: the session its parts and commit carry
    meta: dict[str, Any]  # what the manifest records besides the files, from the first marker read
    folders: dict[int, Path] = field(default_factory=dict)  # by rank: the staged files found here

    @property
    def step(self) -> int:
        return step_of(self.tag) or 0

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    def missing_ranks(self) -> list[int]:
        """The ranks of the world that staged it whose files are not here."""
        return [r for r in range(self.world_size) if r not in self.folders or not self.folders[r].is_dir()]

    def drop(self) -> None:
        for local in self.folders.values():
            drop_staged(local)


class Resumer:
    """The resume side of one run's ``Checkpointer``; ``resume`` is called on every rank."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    # ---------------------------------------------------------------------------------------------
    def resume(self, engine: Any, *, end_step: int | None = None) -> dict[str, Any] | None:
        """Load the checkpoint chosen by ``checkpoint.resume``; returns this rank's trainer state, or None when
        the run starts from scratch. A collective. Rank 0's first line says which checkpoint and step the run
        starts from, or that it starts from scratch.

        Refused, on every rank alike and before anything is downloaded or written (CheckpointError): a
        checkpoint of another model (the manifest's record), or at another global batch (steps would count other
        samples). A checkpoint at or past ``end_step`` (the schedule's end: the run is finished) is refused once it
        has passed verification like any other: a damaged final checkpoint is named and resume falls back to the
        previous one, so a run is never called finished on the word of a checkpoint that cannot be loaded."""
        mode = self.ctx.cfg.resume
        if mode == "never":
            if self.ctx.rank == 0 and not self._set_aside_all():  # which logs that the run starts from scratch
                log.info("run %s starts from scratch (checkpoint.resume = never)", self.ctx.run_id)
            barrier(group=self.ctx.group)
            return None
        survey = broadcast_object(self._survey(mode) if self.ctx.rank == 0 else None, group=self.ctx.group)
        if isinstance(survey, str):
            raise CheckpointError(survey)
        store = Storage(survey["root"], **self.ctx.storage_options)
        if not survey["candidates"]:
            if self.ctx.rank == 0:
                log.info("run %s starts from scratch: no committed checkpoint at %s", self.ctx.run_id, store.uri)
            return None
        # Every rank holds the same manifests (rank 0's survey) and the same config: the same verdict, no collective.
        newest = survey["candidates"][0]
        self._accept(store, *newest, own_run=survey["own_run"], end_step=None)

        def check(tag: str, manifest: dict[str, Any]) -> None:
            # One download per node; a tag any rank cannot use is rejected on every rank.
            err = self._fetch(store, tag, manifest) if self.ctx.local_rank == 0 else ""
            errors = [e for e in all_gather_objects(err, group=self.ctx.group) if e]
            if errors:
                raise CheckpointError(errors[0])

        chosen, rejected = first_good(store, survey["candidates"], check, announce=self.ctx.rank == 0)
        if chosen is None:
            raise CheckpointError(
                f"no checkpoint of {store.uri} passed verification (tried {', '.join(t for t, _ in rejected)}; see "
                f"the warnings above for each file); refusing to start from scratch: fix or remove them, point "
                f"checkpoint.resume at a good checkpoint URI, or pass --checkpoint.resume=never"
            )
        tag, manifest = chosen
        try:
            self._accept(store, tag, manifest, own_run=survey["own_run"], end_step=end_step)
        except CheckpointError:
            shutil.rmtree(self._restore_root(), ignore_errors=True)  # a finished run leaves no download behind
            raise
        if self.ctx.rank == 0:
            log.info(
                "resumed run %s at step %d (epoch %d) from %s, written by %d ranks",
                self.ctx.run_id,
                manifest["step"],
                manifest["epoch"],
                store.url(tag),
                manifest["world_size"],
            )
            changes = config_changes(manifest, config=self.ctx.record.get("config"), config_hash=self.ctx.config_hash)
            if changes:
                log.warning("the config differs from the one that wrote %s (%s)", tag, changes)
        state = self._load(engine, tag, manifest)
        if self.ctx.rank == 0 and survey["own_run"]:
            self._after_resume(store, tag, [t for t, _ in rejected])
        barrier(group=self.ctx.group)
        shutil.rmtree(self._restore_root(), ignore_errors=True)
        return state

    def _accept(
        self, store: Storage, tag: str, manifest: dict[str, Any], *, own_run: bool, end_step: int | None
    ) -> None:
        """Raise CheckpointError when this run must not continue from ``tag`` (see ``resume``)."""
        url = store.url(tag)
        new = "start a new run (--run_id=<new id>) or start this one over (--resume=never)"
        if "model" in self.ctx.record:
            recorded = manifest.get("model")
            name = recorded.get("name") if isinstance(recorded, dict) else None
            check_model(
                manifest,
                url=url,
                model=self.ctx.record["model"],
                fix=f"resume with the config that wrote it (model.name = {name!r}), or {new}",
            )
        old, now = manifest.get("global_batch"), self.ctx.record.get("global_batch")
        if old is not None and now is not None and int(old) != int(now):
            ranks, batch, accum = (
                self.ctx.world_size,
                self.ctx.record.get("batch_size"),
                self.ctx.record.get("grad_accum"),
            )
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
                    f"run {self.ctx.run_id} is finished: its newest committed checkpoint {url} is at step "
                    f"{manifest['step']}, {'the' if int(manifest['step']) == end_step else 'past the'} end of its "
                    f"schedule ({end_step} steps); to train again, {new}"
                )
            raise CheckpointError(
                f"checkpoint.resume = {self.ctx.cfg.resume!r}: {url} is at step {manifest['step']}, at or past the end "
                f"of this schedule ({end_step} steps): nothing is left to train; lengthen the schedule "
                f"(schedule.epochs or schedule.max_steps) or resume from an earlier checkpoint"
            )

    def _survey(self, mode: str) -> dict[str, Any] | str:
        """Rank 0: the candidates to try, newest first, or an error message for every rank to raise."""
        try:
            if mode == "auto":
                store, own = self.ctx.store, True
                self._recover_staged()
            else:
                store, own = Storage(mode, **self.ctx.storage_options), False
                if store.exists(MANIFEST):  # a step folder itself
                    tag = store.uri.rstrip("/").rsplit("/", 1)[1]
                    parent = Storage(store.uri.rsplit("/", 1)[0], **self.ctx.storage_options)
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
        staged = self._staged_steps()
        committed = committed_tags(self.ctx.store)
        newest = -1  # the newest committed step; -1 when none is, so that every staged step is newer
        if committed:
            newest = step_of(committed[0]) or 0
        lost: dict[int, str] = {}  # step: why it cannot be committed from here
        incomplete: dict[int, StagedStep] = {}
        for s in staged:
            if s.step <= newest:
                s.drop()  # the store already holds this step or a newer one
                continue
            missing = s.missing_ranks()
            if missing:
                lost[s.step] = (
                    f"{s.tag} (in {self.ctx.staging} without the files of rank(s) {', '.join(map(str, missing))}: "
                    f"node-local staging on another node?)"
                )
                incomplete[s.step] = s
                continue
            self._commit_staged(s)
            s.drop()
            newest = s.step
        for step, s in incomplete.items():
            if step < newest:  # a newer step was recovered: this one is not needed any more
                lost.pop(step)
                s.drop()
        self._report_lost(lost, newest=newest)

    def _staged_steps(self) -> list[StagedStep]:
        """What the markers in the staging folder name, oldest step first; unreadable markers are skipped."""
        staged: dict[tuple[str, str], StagedStep] = {}
        for marker in sorted(self.ctx.staging.glob("rank-*/step-*.staged.json")):
            try:
                info = json.loads(marker.read_text())
                meta, rank, session = info["meta"], int(info["rank"]), str(info["session"])
                tag = str(meta["tag"])
                found = staged.setdefault((tag, session), StagedStep(tag=tag, session=session, meta=meta))
                found.folders[rank] = marker.parent / tag
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring the unreadable staging marker %s (%s)", marker, e)
        return sorted(staged.values(), key=lambda s: s.step)

    def _commit_staged(self, s: StagedStep) -> None:
        """Upload every rank's staged files of ``s`` and commit them under the session that staged them."""
        store, cfg = self.ctx.store, self.ctx.cfg
        log.warning(
            "checkpoint %s of run %s never reached %s: uploading it from the staging folder %s before resuming",
            s.tag,
            self.ctx.run_id,
            store.uri,
            self.ctx.staging,
        )
        try:
            for r, local in sorted(s.folders.items()):
                files = sorted(p for p in local.rglob("*") if p.is_file())
                infos = [store.put(p, f"{s.tag}/{p.relative_to(local).as_posix()}") for p in files]
                write_part(store, s.tag, rank=r, session=s.session, step=s.step, files=infos)
            commit(
                store,
                s.tag,
                meta=s.meta,
                session=s.session,
                world_size=s.world_size,
                keep_last=cfg.keep_last,
                keep_every=cfg.keep_every,
            )
        except (StorageError, PartsMissing) as e:
            raise CheckpointError(
                f"cannot upload {s.tag}, left in the staging folder {self.ctx.staging} by an earlier process, to "
                f"{store.uri} ({e}); fix the storage and restart, or pass --checkpoint.resume=never"
            ) from e

    def _report_lost(self, lost: dict[int, str], *, newest: int) -> None:
        """Warn about the steps after ``newest`` (the newest committed) that this start cannot commit: ``lost``
        (staged here without every rank's files) and the uncommitted ones on the store."""
        store = self.ctx.store
        for t in list_steps(store):
            step = step_of(t) or 0
            if step > newest and step not in lost and not any(n.startswith("manifest") for n in store.list(t)):
                lost[step] = f"{t} (partly on the store, its staged files not in {self.ctx.staging})"
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
        return self.ctx.staging / f"restore-{socket.gethostname()}"

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
            if old_world != self.ctx.world_size and int(manifest.get("zero_stage", 0)) >= 1:
                load_zero1_resharded(engine, root, tag, old_world=old_world, new_world=self.ctx.world_size)
            else:
                path, _ = engine.load_checkpoint(str(root), tag=tag)
                if path is None:
                    raise CheckpointError(f"DeepSpeed found no checkpoint in {root / tag}")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a verified checkpoint that does not load is a config mismatch
            raise CheckpointError(
                f"checkpoint {self.ctx.store.url(tag)} passed verification but DeepSpeed cannot load it ({e}); was "
                f"it written for another model or ZeRO stage? (config hash {manifest.get('config_hash')}, now "
                f"{self.ctx.config_hash})"
            ) from e
        # A rank that did not exist in the old run takes rank 0's file: only its shared part is used.
        own = root / tag / f"trainer-rank{self.ctx.rank}.pt"
        return torch.load(own if self.ctx.rank < old_world else root / tag / "trainer-rank0.pt", weights_only=False)

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
            tags = committed_tags(self.ctx.store)
            for t in tags:
                set_aside(self.ctx.store, t, "set-aside")
            self.ctx.store.delete(LATEST)
            if tags:
                log.warning(
                    "run %s starts from scratch (checkpoint.resume = never): its %d committed checkpoints at %s "
                    "were set aside (manifest.json renamed to manifest.set-aside.json)",
                    self.ctx.run_id,
                    len(tags),
                    self.ctx.store.uri,
                )
            return len(tags)
        except StorageError as e:
            raise CheckpointError(f"checkpoint.resume = never: cannot set aside the old checkpoints ({e})") from e
