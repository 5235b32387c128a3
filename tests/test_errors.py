"""pipeline.core.errors: how a user error reaches the user, once, on every launch."""

from __future__ import annotations

import time

import pytest

from pipeline.core.errors import ConfigError, report_error


def test_a_silent_rank_outlives_rank_0s_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun stops the group when the first worker exits: the rank that rank 0 speaks for must not exit first,
    or the user sees exit 2 and no reason (seen in CI on a loaded machine)."""
    err = ConfigError("schedule.max_steps: must be positive")
    report_error(err, rank=0, grace_s=0.0)
    assert capsys.readouterr().err == "error: schedule.max_steps: must be positive\n"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    start = time.monotonic()
    report_error(err, rank=1, grace_s=0.2)
    assert time.monotonic() - start >= 0.2 and capsys.readouterr().err == ""
    start = time.monotonic()
    report_error(err, rank=2, grace_s=5.0)  # another node: its torchrun must not outlive rank 0's
    assert time.monotonic() - start < 5.0 and capsys.readouterr().err == ""
    report_error(RuntimeError("boom"), rank=1, grace_s=5.0)  # an error only this rank saw: said at once
    assert capsys.readouterr().err == "error (rank 1): boom\n"
