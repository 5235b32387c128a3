"""The training loop: one DeepSpeed engine, one train and one val source, a schedule, and its duties.

The loop avoids host synchronisation: losses and hits accumulate on the device and are reduced across
ranks every ``log_every`` steps. That reduction is also where ranks agree on stop requests and
non-finite losses, so every rank takes the same branch and no collective is left waiting.

With ``diagnostics`` (pipeline/runtime/diagnostics.py), the steps that log also take per-stage gradient norms (reduced
in that same collective), and rank 0 measures Figure 7's response std at chosen steps and at the end.

The trainer counts optimizer steps only; which epoch and which batch of it the run is at is the
training source's :attr:`~pipeline.data.source.DataSource.position`, saved and restored with the source.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import CheckpointConfig
from pipeline.core.distributed import DistEnv, all_reduce_max, all_reduce_sum, is_multi_rank
from pipeline.core.stop import StopFlag
from pipeline.data import DataSource
from pipeline.runtime.diagnostics import Diagnostics
from pipeline.runtime.engine import TrainingEngine, set_lr
from pipeline.runtime.metrics import MetricSums, efficiency
from pipeline.runtime.progress import ConsoleReporter
from pipeline.runtime.schedule import LRSchedule
from pipeline.tracking import NullTracker, Tracker

log = logging.getLogger("pipeline.trainer")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message says at which step and what to try."""


@dataclass
class FitResult:
    step: int
    epoch: int
    stopped: bool  # True when a stop signal ended the run early (the caller exits with the requeue code)
    samples: int = 0  # training images the optimizer steps consumed: step x global batch (the schedule's budget)
    final_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0: one entry per logged step/eval


class CheckpointSaver(Protocol):
    """What the trainer uses of a :class:`~pipeline.checkpoint.Checkpointer`: when to save, and saving."""

    cfg: CheckpointConfig  # the trainer reads ``at_end``

    def should_save(self, step: int) -> bool: ...

    def save(self, engine: TrainingEngine, *, step: int, epoch: int, trainer_state: dict[str, Any]) -> str: ...


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """How long the loop runs and how often it reports: optimizer steps, steps per metric reduction, epochs per
    evaluation, and whether rank 0 draws a progress bar (on a terminal; log lines otherwise)."""

    total_steps: int
    log_every: int = 10
    eval_every: int = 1
    progress: bool = True
    flops_per_image: float = 0.0  # training FLOPs of one image (forward and backward), for TFLOP/s and MFU; 0 = none


@dataclass(frozen=True, kw_only=True)
class TrainerParts:
    """The collaborators the trainer drives, each built elsewhere (pipeline.wiring). ``val_source`` is scored
    by every evaluation; ``checkpointer`` None saves nothing; ``diagnostics`` None measures nothing extra."""

    engine: TrainingEngine
    train_source: DataSource
    val_source: DataSource
    schedule: LRSchedule
    tracker: Tracker | None = None  # None: a NullTracker
    checkpointer: CheckpointSaver | None = None
    diagnostics: Diagnostics | None = None
    stop: StopFlag | None = None  # None: a flag no signal sets


class Trainer:
    """fit / train_step / evaluate / state_dict. Every collaborator is built elsewhere and passed in."""

    def __init__(self, parts: TrainerParts, *, loop: LoopSettings, env: DistEnv) -> None:
        engine = parts.engine
        self.engine = engine
        self.train_source = parts.train_source
        self.val_source = parts.val_source
        self.schedule = parts.schedule
        self.total_steps = loop.total_steps
        self.rank = env.rank
        self.world_size = env.world_size
        self.device = env.device
        self.log_every = loop.log_every
        self.eval_every = loop.eval_every
        self.progress = loop.progress and env.is_main
        self.flops_per_image = loop.flops_per_image
        self.tracker: Tracker = parts.tracker or NullTracker()
        self.checkpointer = parts.checkpointer
        self.stop = parts.stop or StopFlag()
        self.diagnostics = parts.diagnostics
        self._grad_norms = parts.diagnostics.grad_norms if parts.diagnostics is not None else None
        self._logs_this_step = False  # the step being taken ends with a metric reduction (_log)
        self._grad_sq: torch.Tensor | None = None  # per-stage squared gradient norms of that step, on the device
        self.grad_accum = engine.gradient_accumulation_steps()
        self.global_batch = int(engine.train_batch_size())  # images per optimizer step over all ranks
        # [first step, world size] of each stretch of the run
        self.world_sizes: list[list[int]] = [[0, self.world_size]]
        self.steps_per_epoch = max(1, len(self.train_source) // self.grad_accum)
        self.step = 0  # optimizer steps taken; the epoch and batch within it are the train source's position
        self._buffers_synced_at = -1  # the step whose BN buffers were last averaged over ranks
        self.history: list[dict[str, float]] = []
        self._sums = MetricSums(self.device)
        self._wait = 0.0
        self._busy = 0.0
        self._images = 0
        self._steps_timed = 0  # optimizer steps since the last log
        self._mark = 0.0  # when the current step's time started counting
        self._epoch_batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._last_val: dict[str, float] = {}
        self._console: ConsoleReporter | None = None  # rank 0 during fit: the bar, or log lines in a file

    # ---------------------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, backward, and (at accumulation boundaries) the optimizer step."""
        set_lr(self.engine.optimizer, self.schedule.lr(self.step))
        logits = self.engine(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.engine.backward(loss)
        if self._grad_norms is not None and self._logs_this_step and self.engine.is_gradient_accumulation_boundary():
            # Between the boundary's backward (gradients accumulated and averaged over ranks) and the step that
            # clears them; only at steps that log, and nothing leaves the device until _log reduces it.
            self._grad_sq = self._grad_norms.squared()
        self.engine.step()
        self._sums.update(loss, logits, labels)
        return loss

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average BN running statistics over ranks (timm's distribute_bn).

        DeepSpeed all-reduces gradients but, unlike DDP, never touches buffers, so each rank's running
        mean/var drift with its own shard. Averaging them at every metric reduction, evaluation and
        save makes every replica the same model, the saved one the consensus rather than rank 0's
        view, and keeps a resumed run bitwise on the path of an uninterrupted one (both sync at the
        same steps; stop-signal saves happen at metric reductions).
        """
        if not is_multi_rank() or self._buffers_synced_at == self.step:
            # Buffers change only in training steps: a log, an evaluation and a save at the same step need one
            # average, and averaging averaged values again is not exact on world sizes that are not powers of 2.
            return
        self._buffers_synced_at = self.step
        # One collective per dtype instead of one per buffer: ResNet-152 has over 450 BN buffers.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buf in self.engine.module.buffers():
            if buf.is_floating_point():
                by_dtype.setdefault(buf.dtype, []).append(buf)
        for bufs in by_dtype.values():
            flat = all_reduce_sum(torch.cat([b.reshape(-1) for b in bufs]))
            flat /= self.world_size
            for b, v in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                b.copy_(v.view_as(b))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and top-1/top-5 error over the whole validation split, each image counted once."""
        self.sync_buffers()
        self.engine.eval()
        sums = MetricSums(self.device)
        for images, labels in self.val_source:
            logits = self.engine(images)
            sums.update(F.cross_entropy(logits.float(), labels), logits, labels)
        self.engine.train()
        out = sums.reduce()
        if out["count"] != self.val_source.num_samples:
            raise RuntimeError(
                f"evaluation saw {out['count']} images but the validation split has "
                f"{self.val_source.num_samples}: the val source's sharding is broken"
            )
        return {f"val_{k}": v for k, v in out.items() if k != "count"}

    # ---------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epochs completed, as the training source counts them (it owns the data position)."""
        return self.train_source.position[0]

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of a resume: counters, schedule, data position and every RNG."""
        epoch, micro_in_epoch = self.train_source.position
        return {
            # "epoch" and "micro_in_epoch" repeat the data position for a resume on another number of ranks,
            # where the data state cannot be loaded (and for readers of older checkpoints).
            "step": self.step,
            "epoch": epoch,
            "micro_in_epoch": micro_in_epoch,
            "world_size": self.world_size,
            "world_sizes": self.world_sizes,
            "global_batch": self.global_batch,
            "samples": self.step * self.global_batch,  # the same at any world size: resumes keep the global batch
            "schedule": self.schedule.state_dict(),
            "data": self.train_source.state_dict(),
            "history": self.history if self.rank == 0 else [],
            "tracking_run_id": self.tracker.run_id,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self._buffers_synced_at = self.step  # a checkpoint's buffers were averaged when it was saved
        self.schedule.load_state_dict(state["schedule"])
        self.history = list(state.get("history", []))
        self.world_sizes = [list(w) for w in state.get("world_sizes", [[0, state["world_size"]]])]
        if self.world_sizes[-1][1] != self.world_size:
            self.world_sizes.append([self.step, self.world_size])
        if state["world_size"] == self.world_size:
            self.train_source.load_state_dict(state["data"])  # the exact position, epoch included
            rng = state["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            # A different world size reshards the data: the epoch restarts, which the log says.
            if self.rank == 0:
                log.warning(
                    "resuming on %d ranks from a checkpoint written by %d: the data order restarts "
                    "epoch %d (%d micro-batches of it were already seen)",
                    self.world_size,
                    state["world_size"],
                    state["epoch"],
                    state["micro_in_epoch"],
                )
            self.train_source.start_epoch(state["epoch"])

    # ---------------------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch, from the next epoch once the current one is used up; the wait is timed."""
        t0 = time.perf_counter()
        while True:
            if self._epoch_batches is None:
                # One iter() per epoch: it yields the rest of the source's current epoch.
                self._epoch_batches = iter(self.train_source)
            try:
                batch = next(self._epoch_batches)
                break
            except StopIteration:
                self._epoch_batches = None
        self._wait += time.perf_counter() - t0
        return batch

    def _log(self) -> bool:
        """Reduce metrics across ranks; returns True when the ranks agree to stop. A collective call."""
        self.sync_buffers()
        grad_norms: dict[str, float] = {}
        if self._grad_sq is not None:
            # Every rank took its norms at this same step: one collective carries them with the metrics.
            m, summed = self._sums.reduce_with(self._grad_sq)
            grad_norms = self._grad_norms.finish(summed, world_size=self.world_size)
            self._grad_sq = None
        else:
            m = self._sums.reduce()
        elapsed = self._busy  # wall time of the loop since the last log, data waits included
        rates = all_reduce_max(
            torch.tensor([float(self.stop.is_set), elapsed, self._wait], dtype=torch.float64, device=self.device)
        ).tolist()
        stop_any, elapsed_max, wait_max = rates
        if not math.isfinite(m["loss"]):
            raise TrainingDiverged(
                f"training loss became {m['loss']} at step {self.step} (epoch {self.epoch}); lower --optim.lr "
                f"(now {self.schedule.lr(self.step):g}), add warm-up (--schedule.warmup), or enable "
                f"--optim.grad_clip; the last committed checkpoint is kept"
            )
        epoch, batch = self.train_source.position
        images_per_s = self._images * self.world_size / max(elapsed_max, 1e-9)
        speed = efficiency(
            step_time_s=elapsed_max / max(1, self._steps_timed),
            images_per_s=images_per_s,
            world_size=self.world_size,
            flops_per_image=self.flops_per_image,
            device=self.device,
        )
        row = {
            "step": self.step,
            "epoch": epoch + batch / max(1, len(self.train_source)),
            "train_loss": m["loss"],
            "train_top1_error": m["top1_error"],
            "train_top5_error": m["top5_error"],
            "lr": self.schedule.lr(max(0, self.step - 1)),
            "images_per_s": images_per_s,
            "data_wait_share": wait_max / max(elapsed_max, 1e-9),
            **speed,
            **grad_norms,
        }
        if self.schedule.observe_train_error(m["top1_error"]) and self.rank == 0:
            log.info(
                "train error %.1f%% is below the warm-up threshold: lr goes to %g",
                m["top1_error"],
                self.schedule.lr(self.step),
            )
        self._record(row)
        self._sums.reset()
        self._wait = self._busy = 0.0
        self._images = self._steps_timed = 0
        return bool(stop_any)

    def _record(self, row: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.history.append(row)
        metrics = {k: v for k, v in row.items() if k not in ("step",)}
        self.tracker.log_metrics(int(row["step"]), metrics)
        if self._console is not None:
            self._console.report(row)

    def _save(self) -> None:
        if self.checkpointer is not None:
            self.sync_buffers()
            self.checkpointer.save(self.engine, step=self.step, epoch=self.epoch, trainer_state=self.state_dict())

    def _eval_and_record(self) -> dict[str, float]:
        val = self.evaluate()
        self.schedule.observe_val_error(val["val_top1_error"])
        self._record({"step": self.step, "epoch": float(self.epoch), **val})
        self._last_val = val
        return val

    # ---------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> bool:
        """Micro-batches up to and including the next optimizer step (``grad_accum`` of them).

        An epoch may end inside the accumulation window: it is closed there, before the window's other
        micro-batches. Returns True when the step's own last micro-batch ended an epoch (the caller closes
        that one, after the step's log).
        """
        before = self.engine.global_steps
        self._logs_this_step = self._logs_at(self.step + 1)
        while True:
            images, labels = self._next_batch()
            self.train_step(images, labels)
            self._images += labels.shape[0]
            epoch_ended = self.train_source.position[1] == 0
            if self.engine.global_steps != before:
                break
            if epoch_ended:
                self._end_epoch()
        self.step += 1
        self._steps_timed += 1
        now = time.perf_counter()
        self._busy += now - self._mark
        self._mark = now
        if self._console is not None:
            self._console.advance()
        return epoch_ended

    def _logs_at(self, step: int) -> bool:
        """Whether ``fit`` reduces metrics after optimizer step ``step`` (every ``log_every`` steps and the last)."""
        return step % self.log_every == 0 or step >= self.total_steps

    def _measure_responses(self, *, final: bool = False, evaluated: bool = False) -> None:
        """Figure 7's response std on rank 0, when due now (after an evaluation, a chosen step, every N steps, or
        the end), logged at this step so MLflow draws each stage's line over training: no collective."""
        if self.diagnostics is None or not self.diagnostics.response_due(self.step, final=final, evaluated=evaluated):
            return
        path, metrics = self.diagnostics.measure_responses(step=self.step, final=final)
        if path is not None:
            self.tracker.log_artifact(str(path), "diagnostics")
        self.tracker.log_metrics(self.step, metrics)

    def _end_epoch(self) -> None:
        """Evaluate every ``eval_every`` epochs. Not called at the last step: the final evaluation covers it."""
        if self.epoch % self.eval_every == 0:
            self._eval_and_record()
            self._measure_responses(evaluated=True)
            self._mark = time.perf_counter()  # evaluation time is not training time in images_per_s

    def _save_due(self) -> bool:
        # should_save may be a collective (every_minutes): every rank calls it at every step that is not stopping.
        return self.checkpointer is not None and self.checkpointer.should_save(self.step)

    def fit(self) -> FitResult:
        """Optimizer steps up to ``total_steps``; after each: log, stop, close an epoch, save, in that order.

        Logging every ``log_every`` steps (and at the last) is where ranks agree on a stop request: a stop
        saves and ends the run without evaluating. An epoch that ends with the step is evaluated before a
        periodic save, so a resume from that save neither repeats nor skips the evaluation. A run that was
        not stopped ends with a final evaluation and, with checkpoint.at_end, a save.
        """
        if self.rank == 0:
            # A bar only where it can redraw (progress on, stderr a terminal); plain lines otherwise.
            self._console = ConsoleReporter(total_steps=self.total_steps, start_step=self.step, bar=self.progress)
            if self.history:
                # Points logged after the tracker's last flush before a crash are in the checkpoint's history
                # only: the tracker sends MLflow those it does not have, once.
                self.tracker.resend_history(self.history)
        self.engine.train()
        self._epoch_batches = None
        self._last_val = {}  # a stopped run reports the last epoch's evaluation, if any
        self._mark = time.perf_counter()
        stopped = False
        try:
            while self.step < self.total_steps and not stopped:
                epoch_ended = self._optimizer_step()
                last = self.step >= self.total_steps
                if self._logs_at(self.step):
                    # A stop agreed at the last step finishes the run instead (its final evaluation and save follow
                    # at once): a checkpoint at the schedule's end is always a finished run's, which resume refuses.
                    stopped = self._log() and not last
                if stopped:
                    self._save()
                elif not last:
                    if epoch_ended:
                        self._end_epoch()
                    self._measure_responses()
                    if self._save_due():
                        self._save()
            if not stopped:
                self._eval_and_record()
                self._measure_responses(final=True)
                if self.checkpointer is not None and self.checkpointer.cfg.at_end:
                    self._save()
        finally:
            if self._console is not None:
                self._console.close()
                self._console = None
            self._epoch_batches = None
        return FitResult(
            step=self.step,
            epoch=self.epoch,
            stopped=stopped,
            samples=self.step * self.global_batch,
            final_val=self._last_val,
            history=self.history,
        )
