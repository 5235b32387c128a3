"""Rank 0's console during training: a progress bar on a terminal, plain log lines in a file.

A bar redraws itself with ``\\r``; written to a file (every SLURM job's ``.out``) that becomes one line of tens of
thousands of characters. So the bar is drawn only when stderr is a terminal and ``progress`` is on; otherwise
each metric reduction (every ``log_every`` steps) is one line with step, epoch, loss, error, img/s, data wait,
lr and ETA, and each evaluation one line, through the ``pipeline.progress`` logger (timestamped like the rest).

:class:`ShortLines` is the log format of a training process: it keeps every line of a record, tracebacks
included, within :data:`MAX_LINE` characters by wrapping longer ones, so nothing (a long MLflow or DALI
message, a param value) makes the log unreadable in a file.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

log = logging.getLogger("pipeline.progress")

MAX_LINE = 300  # the longest line a training job's log may have
_CONTINUATION = "    ... "  # starts each piece of a wrapped line


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line, exact enough for an ETA."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ConsoleReporter:
    """What rank 0 shows while it trains. ``advance`` after each optimizer step; ``report`` with each row the
    trainer records (a metric reduction, or an evaluation with ``val_*`` keys); ``close`` at the end."""

    def __init__(
        self, *, total_steps: int, start_step: int = 0, bar: bool = True, stream: TextIO | None = None
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.total_steps = total_steps
        self._start_step = start_step  # ETA from this process's own pace: a resume does not count earlier steps
        self._t0 = time.monotonic()
        self._bar: Any = None
        self._shown: dict[str, str] = {}  # the bar's postfix
        if bar and is_terminal(stream):
            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train", file=stream
            )

    @property
    def draws_bar(self) -> bool:
        return self._bar is not None

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def report(self, row: dict[str, float]) -> None:
        if self._bar is not None:
            self._postfix(row)
        elif "val_top1_error" in row:
            log.info("%s", self.eval_line(row))
        elif "train_loss" in row:
            log.info("%s", self.train_line(row))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- the lines ------------------------------------------------------------------------------------
    def eta_s(self, step: int) -> float | None:
        """Seconds to ``total_steps`` at this process's pace so far (evaluations included), or None yet."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._t0) / done * max(0, self.total_steps - step)

    def train_line(self, row: dict[str, float]) -> str:
        step = int(row["step"])
        eta = self.eta_s(step)
        return (
            f"step {step}/{self.total_steps} | epoch {row.get('epoch', 0.0):.2f} | loss {row['train_loss']:.4f}"
            f" | error {row.get('train_top1_error', float('nan')):.2f}%"
            f" | {row.get('images_per_s', 0.0):.0f} img/s | data wait {100 * row.get('data_wait_share', 0.0):.0f}%"
            f" | lr {row.get('lr', float('nan')):.4g} | ETA {format_duration(eta) if eta is not None else '?'}"
        )

    @staticmethod
    def eval_line(row: dict[str, float]) -> str:
        return (
            f"evaluation at step {int(row['step'])} (epoch {row.get('epoch', 0.0):g}): val loss "
            f"{row.get('val_loss', float('nan')):.4f} | top-1 error {row['val_top1_error']:.2f}%"
            f" | top-5 error {row.get('val_top5_error', float('nan')):.2f}%"
        )

    def _postfix(self, row: dict[str, float]) -> None:
        short = {
            "loss": f"{row['train_loss']:.3f}" if "train_loss" in row else None,
            "err": f"{row['train_top1_error']:.1f}%" if "train_top1_error" in row else None,
            "val": f"{row['val_top1_error']:.2f}%" if "val_top1_error" in row else None,
            "img/s": f"{row['images_per_s']:.0f}" if "images_per_s" in row else None,
            "wait": f"{100 * row['data_wait_share']:.0f}%" if "data_wait_share" in row else None,
        }
        # Merged: an evaluation adds val= to the training metrics shown, rather than replacing them.
        self._shown.update({k: v for k, v in short.items() if v is not None})
        self._bar.set_postfix(self._shown, refresh=False)


def wrap_long_lines(text: str, *, width: int = MAX_LINE) -> str:
    """``text`` with every line longer than ``width`` split into pieces, each continued on a line of its own."""
    if all(len(line) <= width for line in text.splitlines()):
        return text
    out: list[str] = []
    for line in text.splitlines():
        out.append(line[:width])
        rest = line[width:]
        piece = width - len(_CONTINUATION)
        while rest:
            out.append(_CONTINUATION + rest[:piece])
            rest = rest[piece:]
    return "\n".join(out)


def unwrap_lines(text: str) -> str:
    """The inverse of :func:`wrap_long_lines`: continued pieces joined back onto their line (for reading logs)."""
    return text.replace("\n" + _CONTINUATION, "")


class ShortLines(logging.Formatter):
    """A log format whose lines are at most :data:`MAX_LINE` characters: a longer line is wrapped, not cut."""

    def format(self, record: logging.LogRecord) -> str:
        return wrap_long_lines(super().format(record))
