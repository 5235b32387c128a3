"""LR schedules: the paper's step rule, warm-up, cosine, plateau, and the ResNet-110 warm-up gate."""

from __future__ import annotations

import math

import pytest

from pipeline.config import ScheduleConfig
from pipeline.runtime.schedule import LRSchedule, scaled_lr


def sched(**kw) -> LRSchedule:
    return LRSchedule(ScheduleConfig(**kw), base_lr=0.1, steps_per_epoch=10)


def test_multistep_in_epochs_divides_by_ten():
    s = sched(kind="multistep", epochs=9, milestones=[3, 6])
    assert [s.lr(x) for x in (0, 29, 30, 59, 60, 89)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert s.total_steps == 90


def test_cifar_recipe_in_iterations():
    s = sched(kind="multistep", max_steps=64000, unit="step", milestones=[32000, 48000])
    assert s.total_steps == 64000
    assert s.lr(31999) == pytest.approx(0.1) and s.lr(32000) == pytest.approx(0.01)
    assert s.lr(48000) == pytest.approx(0.001)


def test_linear_warmup_reaches_base_lr():
    s = sched(kind="multistep", epochs=10, milestones=[5], warmup=2, warmup_factor=0.1)
    assert s.lr(0) == pytest.approx(0.01)
    assert s.lr(10) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert s.lr(20) == pytest.approx(0.1)


def test_cosine_ends_at_floor():
    s = sched(kind="cosine", epochs=10, min_lr=0.0)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(50) == pytest.approx(0.05) and s.lr(100) == pytest.approx(0.0)


def test_plateau_divides_after_patience_and_round_trips():
    s = sched(kind="plateau", epochs=10, plateau_patience=2)
    assert not s.observe_val_error(50.0)
    assert not s.observe_val_error(50.0)
    assert s.observe_val_error(50.0)
    assert s.lr(0) == pytest.approx(0.01)
    t = sched(kind="plateau", epochs=10, plateau_patience=2)
    t.load_state_dict(s.state_dict())
    assert t.lr(0) == pytest.approx(0.01)


def test_resnet110_warmup_until_train_error_below_80():
    s = sched(kind="multistep", max_steps=1000, unit="step", milestones=[500], warmup_until_error=80.0)
    assert s.lr(0) == pytest.approx(0.01)
    assert not s.observe_train_error(85.0)
    assert s.lr(100) == pytest.approx(0.01)
    assert s.observe_train_error(79.0)
    assert s.lr(101) == pytest.approx(0.1)
    assert math.isinf(s.best_error)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, reference_batch=256, global_batch=8192) == pytest.approx(3.2)


@pytest.mark.parametrize("num_samples", [1437, 1000, 50000, 127])
@pytest.mark.parametrize("world, batch, accum", [(1, 16, 1), (2, 8, 1), (1, 8, 2), (4, 2, 2), (8, 1, 2)])
def test_an_epoch_is_the_same_steps_at_any_world_size(num_samples, world, batch, accum):
    """What the training sources yield per rank ((N // W) // b micro-batches, grad_accum per step) is
    epoch_steps(N, global batch): at a global batch of 16 every split above has the same epoch on 1 to 8 ranks."""
    from pipeline.runtime.schedule import epoch_steps

    assert ((num_samples // world) // batch) // accum == epoch_steps(num_samples, global_batch=world * batch * accum)
    assert epoch_steps(num_samples, global_batch=world * batch * accum) == num_samples // 16


def test_max_steps_truncates_an_epoch_schedule_with_milestones_and_warmup():
    # One override for a smoke run of an epoch config (configs/cpu/_digits.toml's schedule): milestones and the
    # warm-up stay at their epochs, the run just ends earlier.
    s = sched(kind="multistep", epochs=10, milestones=[7, 9], warmup=1, max_steps=75)
    full = sched(kind="multistep", epochs=10, milestones=[7, 9], warmup=1)
    assert s.total_steps == 75 and full.total_steps == 100
    assert [s.lr(x) for x in (0, 5, 10, 69, 70, 74)] == pytest.approx([full.lr(x) for x in (0, 5, 10, 69, 70, 74)])
    assert s.lr(70) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "config",
    ["configs/cpu/digits_resnet20.toml", "configs/cifar10/cifar_resnet20.toml", "configs/imagenet/resnet50.toml"],
)
def test_max_steps_is_accepted_by_every_kind_of_config(config):
    from pathlib import Path

    from pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / config, ["--schedule.max_steps=20"])
    assert cfg.schedule.max_steps == 20 and cfg.schedule.milestones  # the milestones stay, in their unit
