"""Rank 0's console: a bar on a terminal, plain short lines in a file, and no result line after a stop.

The reporter is checked on a real pseudo-terminal and a real file; the end-to-end tests train the digits
demo network (configs/cpu/ with tests/tiny.py's overrides) with stderr redirected to a file, as under SLURM.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from tiny import TINY

from pipeline.core.stop import STOP_EXIT_CODE
from pipeline.runtime.progress import MAX_LINE, ConsoleReporter, ShortLines, format_duration, wrap_long_lines

REPO = Path(__file__).resolve().parents[1]

TRAIN_LINE = re.compile(
    r"INFO pipeline\.progress: step (\d+)/(\d+) \| epoch \d+\.\d\d \| loss \d+\.\d+ \| error \d+\.\d\d% \| "
    r"\d+ img/s \| data wait \d+% \| lr [\d.e-]+ \| ETA (\d+s|\d+m\d\ds|\d+h\d\dm|\?)$"
)
EVAL_LINE = re.compile(
    r"INFO pipeline\.progress: evaluation at step (\d+) \(epoch \d+\): val loss \d+\.\d+ \| "
    r"top-1 error \d+\.\d\d% \| top-5 error \d+\.\d\d%$"
)
ROW = {
    "step": 20,
    "epoch": 0.45,
    "train_loss": 2.25,
    "train_top1_error": 80.0,
    "train_top5_error": 30.0,
    "lr": 0.1,
    "images_per_s": 812.4,
    "data_wait_share": 0.05,
}
VAL = {"step": 44, "epoch": 1.0, "val_loss": 1.5, "val_top1_error": 40.0, "val_top5_error": 5.0}


def _read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


# -- the reporter -------------------------------------------------------------------------------------
def _report(stream, *, bar: bool, caplog) -> list[str]:
    caplog.clear()
    console = ConsoleReporter(total_steps=100, start_step=0, bar=bar, stream=stream)
    for _ in range(20):
        console.advance()
    console.report(ROW)
    console.report(VAL)
    console.close()
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def test_a_terminal_gets_the_bar_and_a_file_or_progress_false_gets_lines(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    main, side = os.openpty()  # a real terminal, 120 columns wide (a new one has 0: the bar would be empty)
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        with open(side, "w", closefd=False) as tty:
            assert _report(tty, bar=True, caplog=caplog) == []  # the bar shows the metrics
            bar = _read_all(main)
            assert "20/100" in bar and "loss=2.250" in bar
            # --progress=false on a terminal: the lines, not silence.
            assert len(_report(tty, bar=False, caplog=caplog)) == 2
    finally:
        os.close(main)
        os.close(side)
    with open(tmp_path / "job.out", "w") as file:
        assert not ConsoleReporter(total_steps=1, bar=True, stream=file).draws_bar
        lines = _report(file, bar=True, caplog=caplog)
    assert (tmp_path / "job.out").read_text() == ""  # no bar, not a character of one
    assert lines[0].startswith("step 20/100 | epoch 0.45 | loss 2.2500 | error 80.00% | 812 img/s | data wait 5%")
    assert "| lr 0.1 | ETA " in lines[0]
    assert lines[1] == "evaluation at step 44 (epoch 1): val loss 1.5000 | top-1 error 40.00% | top-5 error 5.00%"


def test_eta_comes_from_this_process_pace_and_reads_short() -> None:
    console = ConsoleReporter(total_steps=1000, start_step=400, bar=False)
    assert console.eta_s(400) is None  # no step taken yet: no pace
    console._t0 -= 10.0  # 10 s for 100 steps
    assert console.eta_s(500) == pytest.approx(50.0, rel=0.05)
    assert [format_duration(s) for s in (0, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_long_log_lines_are_wrapped_not_cut(tmp_path: Path) -> None:
    text = "x" * 1000
    wrapped = wrap_long_lines(f"short\n{text}")
    assert max(len(line) for line in wrapped.splitlines()) <= MAX_LINE
    assert wrapped.replace("\n    ... ", "") == f"short\n{text}"
    path = tmp_path / "log.txt"
    handler = logging.FileHandler(path)
    handler.setFormatter(ShortLines("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("test_progress.short")
    logger.addHandler(handler)
    try:
        logger.warning("a param value: %s", "v" * 5000)
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = path.read_text().splitlines()
    assert len(lines) > 1 and max(map(len, lines)) <= MAX_LINE


# -- end to end: a training job's log in a file ----------------------------------------------------------
def _train_cmd(tmp_path: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--config",
        str(REPO / "configs/cpu/digits_resnet20.toml"),
        *TINY,
        f"--data.cache_dir={REPO / '.cache/datasets'}",
        f"--checkpoint.uri={tmp_path / 'ckpt'}",
        f"--output_dir={tmp_path / 'runs/{name}'}",
        "--tracking.enabled=false",
        *extra,
    ]
    return cmd, {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_a_job_log_in_a_file_has_one_short_line_per_log_and_per_evaluation(tmp_path: Path) -> None:
    # progress on (the default) but stderr a file, as in every SLURM job; 50 steps cross the epoch end (44).
    cmd, env = _train_cmd(tmp_path, "--progress=true", "--schedule.max_steps=50", "--log_every=5")
    err_path = tmp_path / "job.err"
    with open(err_path, "w") as err:
        res = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=600)
    log = err_path.read_text()
    assert res.returncode == 0, log[-3000:]
    assert "\r" not in log
    assert max(map(len, log.splitlines())) <= MAX_LINE
    lines = [line.split(" ", 2)[2] for line in log.splitlines() if "pipeline.progress" in line]
    steps = [int(m.group(1)) for m in map(TRAIN_LINE.search, lines) if m]
    assert steps == list(range(5, 51, 5)), lines
    assert [int(m.group(1)) for m in map(EVAL_LINE.search, lines) if m] == [44, 50], lines
    assert res.stdout.count("val top-1 error") == 1  # the result of the finished run


@pytest.mark.slow
def test_a_stopped_run_prints_no_result_line(tmp_path: Path) -> None:
    """SIGTERM after the first evaluation: exit 75 and, on stdout, nothing posing as the run's result."""
    cmd, env = _train_cmd(tmp_path, "--schedule.max_steps=2000", "--log_every=2")
    err_path = tmp_path / "job.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 300
            while "evaluation at step" not in err_path.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, err_path.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = err_path.read_text()
    assert proc.returncode == STOP_EXIT_CODE, log[-3000:]
    assert EVAL_LINE.search(next(line for line in log.splitlines() if "evaluation at step" in line))
    assert "val top-1 error" not in out, out
    assert max(map(len, log.splitlines())) <= MAX_LINE
