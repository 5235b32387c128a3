"""Learning-rate schedules, computed from the global step so that a resume needs only the step.

A schedule is a budget of samples: a step is one global batch (``data.batch_size`` x ranks x
``distributed.grad_accum`` images), an epoch is :func:`epoch_steps` steps, so the same config at the same
global batch sees the same samples, with its lr milestones at the same ones, on 1, 2 or 8 ranks. A resume
at another global batch would change what the steps mean: the checkpointer refuses it.

The plateau rule and the "warm up until training error < X" rule (the paper's ResNet-110 recipe) depend
on measurements, so they keep a tiny state that travels in the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.config import ScheduleConfig


def epoch_steps(num_samples: int, *, global_batch: int) -> int:
    """Optimizer steps per epoch of a training split of ``num_samples`` images: ``num_samples // global_batch``,
    whatever the world size W or grad_accum g. It is what the training sources yield: each rank
    ``(N // W) // b`` micro-batches, g of them per step, and ``((N // W) // b) // g == N // (W * b * g)``."""
    return num_samples // global_batch


class LRSchedule:
    """lr(step) for the schedule kinds of ``ScheduleConfig``; ``base_lr`` is already batch-scaled.

    ``total_steps`` is ``schedule.max_steps`` when set (a smaller one truncates the schedule: epoch milestones
    and warm-up stay at their epochs), else ``epochs`` x ``steps_per_epoch`` (:func:`epoch_steps`)."""

    def __init__(self, cfg: ScheduleConfig, *, base_lr: float, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        # Measurement-driven state (checkpointed).
        self.plateau_factor = 1.0
        self.best_error = math.inf
        self.bad_evals = 0
        self.warmup_done = cfg.warmup_until_error <= 0

    def _to_steps(self, n: float) -> int:
        return int(round(n * self.steps_per_epoch)) if self.cfg.unit == "epoch" else int(n)

    def lr(self, step: int) -> float:
        c = self.cfg
        if not self.warmup_done:
            return self.base_lr * c.warmup_factor
        warm = self._to_steps(c.warmup)
        if warm and step < warm:
            f = c.warmup_factor + (1.0 - c.warmup_factor) * step / warm
            return self.base_lr * f
        if c.kind in ("step", "multistep"):
            passed = sum(step >= self._to_steps(m) for m in c.milestones)
            return self.base_lr * c.gamma**passed
        if c.kind == "cosine":
            t = (step - warm) / max(1, self.total_steps - warm)
            return c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if c.kind == "plateau":
            return self.base_lr * self.plateau_factor
        return self.base_lr

    def observe_train_error(self, top1_error: float) -> bool:
        """Feed the running train error; returns True when the error-gated warm-up ends now."""
        if not self.warmup_done and top1_error < self.cfg.warmup_until_error:
            self.warmup_done = True
            return True
        return False

    def observe_val_error(self, top1_error: float) -> bool:
        """Feed a validation error (plateau schedule); returns True when the lr was just divided."""
        if self.cfg.kind != "plateau":
            return False
        if top1_error < self.best_error - self.cfg.plateau_threshold:
            self.best_error, self.bad_evals = top1_error, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.plateau_patience:
            self.plateau_factor *= self.cfg.gamma
            self.bad_evals = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau_factor": self.plateau_factor,
            "best_error": self.best_error,
            "bad_evals": self.bad_evals,
            "warmup_done": self.warmup_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.best_error = state["best_error"]
        self.bad_evals = state["bad_evals"]
        self.warmup_done = state["warmup_done"]


def scaled_lr(lr: float, *, reference_batch: int, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): the lr grows with the global batch."""
    return lr * global_batch / reference_batch
