"""The stop record rank 0 leaves for the batch script, and the signal name a relayed stop is logged with."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipeline.core.stop import SIGNAL_FILE_ENV, STOP_SIGNALS, StopFlag, read_stop_record, write_stop_record
from pipeline.core.stop import STOP_RECORD_ENV as ENV_VAR


def test_record_goes_where_the_launcher_says_and_nowhere_without_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert write_stop_record(step=8, signal="SIGUSR1", checkpoint="step-8", run_id="r") is None
    target = tmp_path / "launch" / "job-7-restart-0" / "stop.json"
    monkeypatch.setenv(ENV_VAR, str(target))
    assert write_stop_record(step=8, signal="SIGUSR1", checkpoint="step-8", run_id="r") == target
    rec = read_stop_record(target)
    assert rec is not None and {k: rec[k] for k in ("step", "signal", "checkpoint", "run_id")} == {
        "step": 8,
        "signal": "SIGUSR1",
        "checkpoint": "step-8",
        "run_id": "r",
    }
    assert [p.name for p in target.parent.iterdir()] == ["stop.json"]  # no temporary left beside it
    assert read_stop_record(tmp_path / "none.json") is None


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize(
    ("sent", "relayed", "logged"),
    [
        ("SIGTERM", "SIGUSR1\n", "SIGUSR1"),  # torchrun_node.sh got USR1 and passed it on as SIGTERM
        ("SIGTERM", None, "SIGTERM"),  # a plain SIGTERM (preemption, scancel)
        ("SIGUSR1", "SIGTERM\n", "SIGUSR1"),  # SLURM's USR1 reached the worker itself first
        ("SIGTERM", "garbage", "SIGTERM"),
    ],
)
def test_stop_flag_names_the_signal_the_launcher_got(
    tmp_path: Path, monkeypatch, handlers, sent: str, relayed: str | None, logged: str
) -> None:
    f = tmp_path / "stop-signal"
    monkeypatch.setenv(SIGNAL_FILE_ENV, str(f))
    flag = StopFlag().install()
    if relayed is not None:  # the launcher writes it as it relays the signal, after the handler was installed
        f.write_text(relayed)
    os.kill(os.getpid(), signal.Signals[sent])
    assert flag.is_set and flag.signal_name == logged and flag.count == 1
    flag.request("again")
    assert flag.signal_name == logged


def test_a_stop_the_launcher_recorded_before_the_handler_existed_is_taken_at_install(
    tmp_path: Path, monkeypatch, handlers
) -> None:
    """A USR1 while the worker was still importing: the launcher wrote the signal down instead of sending SIGTERM
    (which would have killed it); installing the handler takes the stop, named after the launcher's signal."""
    f = tmp_path / "stop-signal"
    monkeypatch.setenv(SIGNAL_FILE_ENV, str(f))
    assert not StopFlag().install().is_set  # no file: no stop
    f.write_text("SIGUSR1\n")
    flag = StopFlag().install()
    assert flag.is_set and flag.signal_name == "SIGUSR1"
