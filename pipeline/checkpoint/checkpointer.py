"""``Checkpointer``, what every rank calls to save, commit, wait and resume: one run's checkpoints on any storage.

Atomic, verified, uploaded in the background, resumed exactly. It sets up what the two paths share
(``context.RunContext``: the run folder, the staging folder, the control group, the session) and hands each
call to the save path (``save.Saver``: stage, upload, commit, wait, stop while storage is down) or to the
resume path (``resume.Resumer``: recover staged steps, choose, verify, load); their docstrings say how each
works. The storage layout is ``layout``'s.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Generic, TypeVar, cast, overload

from pipeline.checkpoint.context import RunContext
from pipeline.checkpoint.layout import CheckpointError, storage_options
from pipeline.checkpoint.resume import Resumer
from pipeline.checkpoint.save import Saver
from pipeline.config import CheckpointConfig
from pipeline.core.distributed import all_gather_objects, broadcast_object, control_group
from pipeline.core.stop import StopFlag
from pipeline.core.storage import Storage, StorageError

T = TypeVar("T")


class _Kept(Generic[T]):
    """A Checkpointer attribute kept by one of its parts (``part``: "_ctx" or "_saver"): reading or setting
    it on the Checkpointer reads or sets what the save and resume paths use."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _Kept[T]: ...
    @overload
    def __get__(self, obj: Checkpointer, objtype: type | None = None) -> T: ...
    def __get__(self, obj: Checkpointer | None, objtype: type | None = None) -> T | _Kept[T]:
        if obj is None:  # on the class (help, inspect): the descriptor itself
            return self
        return cast(T, getattr(getattr(obj, self.part), self.name))

    def __set__(self, obj: Checkpointer, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is called on every rank."""

    # What the two paths share (RunContext says what each is).
    cfg: _Kept[CheckpointConfig] = _Kept("_ctx")
    record: _Kept[dict[str, Any]] = _Kept("_ctx")
    run_id: _Kept[str] = _Kept("_ctx")
    rank: _Kept[int] = _Kept("_ctx")
    world_size: _Kept[int] = _Kept("_ctx")
    local_rank: _Kept[int] = _Kept("_ctx")
    config_hash: _Kept[str] = _Kept("_ctx")
    store: _Kept[Storage] = _Kept("_ctx")
    staging: _Kept[Path] = _Kept("_ctx")
    session: _Kept[str] = _Kept("_ctx")
    # The save path's state (Saver says what each is).
    stop: _Kept[StopFlag | None] = _Kept("_saver")
    blocked_s: _Kept[list[float]] = _Kept("_saver")
    last_saved_step: _Kept[int | None] = _Kept("_saver")
    stranded: _Kept[list[str]] = _Kept("_saver")

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
        opts = storage_options(cfg)
        store = Storage(cfg.uri, **opts).child(run_id)  # first: a bad URI fails before any collective
        group = control_group()
        self._ctx = RunContext(
            cfg=cfg,
            run_id=run_id,
            rank=rank,
            world_size=world_size,
            local_rank=int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank,
            config_hash=config_hash,
            record=dict(record or {}),
            storage_options=opts,
            store=store,
            staging=Path(staging_dir) / run_id,
            group=group,
            session=broadcast_object(uuid.uuid4().hex[:12] if rank == 0 else None, group=group),
        )
        self._saver = Saver(self._ctx, stop=stop)
        self._resumer = Resumer(self._ctx)

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
        errors = [e for e in all_gather_objects(err, group=self._ctx.group) if e]
        if errors:
            raise CheckpointError(f"checkpoint storage check failed for checkpoint.uri = {self.cfg.uri!r}: {errors[0]}")

    def should_save(self, step: int) -> bool:
        """Same answer on every rank. Time-based saves follow rank 0's clock, agreed by a broadcast
        every ``time_check_steps`` steps."""
        return self._saver.should_save(step)

    def save(self, engine: Any, *, step: int, epoch: int, trainer_state: dict[str, Any]) -> str:
        """Write this rank's share locally (a collective with DeepSpeed) and queue the upload.
        Returns the checkpoint's URI; it is committed later (``close`` waits for that)."""
        return self._saver.save(engine, step=step, epoch=epoch, trainer_state=trainer_state)

    def pending(self) -> str:
        return self._saver.pending()

    def wait(self, *, timeout_s: float | None = None) -> None:
        """Every rank waits until all its uploads are done and rank 0 has committed them (``Saver.wait``)."""
        self._saver.wait(timeout_s=timeout_s)

    def close(self) -> None:
        """Wait for every pending checkpoint to be committed, then stop the upload thread."""
        self._saver.close()

    def resume(self, engine: Any, *, end_step: int | None = None) -> dict[str, Any] | None:
        """Load the checkpoint chosen by ``checkpoint.resume``; returns this rank's trainer state, or None when
        the run starts from scratch. A collective; refused (CheckpointError) as ``Resumer.resume`` says."""
        return self._resumer.resume(engine, end_step=end_step)
