"""`pipeline/train.py` with test hooks, run under torchrun by tests/test_checkpoint_e2e.py.

Hooks (environment variables, read here only; the pipeline itself has no test switches):
  TEST_LOSSES=path        rank 0 appends {"step", "train_loss"} per logged step as JSON lines
  TEST_SIGNAL_AT=N        rank 0 sends itself SIGUSR1 while computing step N (a real signal, at a known step)
  TEST_SECOND_SIGNAL=1    every rank sends itself SIGTERM as it starts the stop save (a second signal)
  TEST_PAUSE_UPLOAD=tag:rank:nth:dir
                          that rank's upload thread, about to upload the nth file of checkpoint `tag`,
                          writes dir/paused-rank<R> (holding its pid) and waits until dir/go exists
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import checkpoint  # noqa: E402
from pipeline import train as train_mod  # noqa: E402
from pipeline import trainer as trainer_mod  # noqa: E402
from pipeline.core import storage  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def _record_losses(losses: str) -> None:
    orig_record = trainer_mod.Trainer._record

    def _record(self, row):  # type: ignore[no-untyped-def]
        if "train_loss" in row:
            with open(losses, "a") as f:
                f.write(json.dumps({"step": int(row["step"]), "train_loss": row["train_loss"]}) + "\n")
        return orig_record(self, row)

    trainer_mod.Trainer._record = _record


def _signal_before_step(sig_at: int) -> None:
    orig_step = trainer_mod.Trainer.train_step

    def train_step(self, images, labels):  # type: ignore[no-untyped-def]
        if self.step == sig_at - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return orig_step(self, images, labels)

    trainer_mod.Trainer.train_step = train_step


def _signal_while_saving(sig_at: int) -> None:
    orig_save = checkpoint.Checkpointer.save

    def save(self, engine, **kw):  # type: ignore[no-untyped-def]
        if kw.get("step") == sig_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig_save(self, engine, **kw)

    checkpoint.Checkpointer.save = save


def _pause_upload(tag: str, nth: int, folder: str) -> None:
    orig_put = storage.Storage.put
    seen: list[str] = []

    def put(self, local, rel):  # type: ignore[no-untyped-def]
        if rel.startswith(f"{tag}/"):
            seen.append(rel)
            if len(seen) == nth:
                Path(folder, f"paused-rank{RANK}").write_text(str(os.getpid()))
                while not Path(folder, "go").exists():
                    time.sleep(0.05)
        return orig_put(self, local, rel)

    storage.Storage.put = put


def _install() -> None:
    losses = os.environ.get("TEST_LOSSES")
    if losses and RANK == 0:
        _record_losses(losses)
    sig_at = int(os.environ.get("TEST_SIGNAL_AT", "0"))
    if sig_at and RANK == 0:
        _signal_before_step(sig_at)
    if os.environ.get("TEST_SECOND_SIGNAL"):
        _signal_while_saving(sig_at)
    pause = os.environ.get("TEST_PAUSE_UPLOAD")
    if pause:
        tag, rank, nth, folder = pause.split(":", 3)
        if int(rank) == RANK:
            _pause_upload(tag, int(nth), folder)


if __name__ == "__main__":
    _install()
    sys.exit(train_mod.main())
