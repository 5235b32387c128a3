"""Members of a study running side by side: at most ``parallel`` processes at once, each on its own cores.

A CIFAR or digits network leaves most of a machine idle (one CPU core, or a fraction of a GPU), so running
members concurrently raises the study's throughput. Each process is pinned to a disjoint set of this process's
cores (``core.cpu.cpu_slots``), and the training process sizes its threads from them (``core.cpu``): two
members on a 2-core machine each train with one thread instead of fighting over both cores.

Output: with one process at a time it goes to this terminal as it comes (the progress bar); with several it
goes to one log file per member, and this process prints a line when each starts and ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.cpu import cpu_slots

POLL_S = 0.5


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path | None = None  # None: inherit this terminal (only with parallel = 1)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class _Running:
    proc: subprocess.Popen
    slot: int
    started: float


def run_jobs(
    jobs: list[Job],
    *,
    parallel: int = 1,
    deadline_s: float = 0.0,
    on_start: Callable[[Job, subprocess.Popen], None] | None = None,
    on_exit: Callable[[Job, int, float], None] | None = None,
    stop_after: Callable[[int], bool] | None = None,
    every_s: float = 30.0,
    on_tick: Callable[[list[Job]], None] | None = None,
) -> dict[str, int]:
    """Run ``jobs``, at most ``parallel`` at once, each pinned to its own cores; returns each one's exit code.

    Past ``deadline_s`` (0: none) every running job's process group gets SIGTERM, which training turns into a
    checkpoint and a clean stop; jobs not started get -1. ``stop_after(code)`` True (a member was stopped)
    starts nothing more. Ctrl-C reaches the running jobs (they share this terminal's process group when
    ``parallel`` is 1, and get SIGINT otherwise); those not started get -1. ``on_tick(running jobs)`` is called
    every ``every_s`` seconds while jobs run (a status line when their output goes to logs)."""
    parallel = max(1, parallel)
    slots = cpu_slots(parallel) if parallel > 1 else []
    pending = list(jobs)
    running: dict[str, tuple[Job, _Running]] = {}
    codes: dict[str, int] = {}
    start = time.monotonic()
    halted = False
    ticked = start
    try:
        while running or (pending and not halted):
            while pending and len(running) < parallel and not halted:
                job = pending.pop(0)
                free = sorted(set(range(parallel)) - {r.slot for _, r in running.values()})[0] if slots else 0
                proc = _start(job, cpus=slots[free] if slots else None)
                running[job.name] = (job, _Running(proc, free, time.monotonic()))
                if on_start:
                    on_start(job, proc)
            time.sleep(POLL_S if running else 0)
            if on_tick and running and time.monotonic() - ticked >= every_s:
                ticked = time.monotonic()
                on_tick([job for job, _ in running.values()])
            if deadline_s and not halted and time.monotonic() - start > deadline_s:
                halted = True
                _signal_all(running, signal.SIGTERM)
            for name, (job, r) in list(running.items()):
                rc = r.proc.poll()
                if rc is None:
                    continue
                if job.log is not None:
                    _wait_group(r.proc.pid)  # a stopped runner's training child may still be saving
                codes[name] = rc
                del running[name]
                if on_exit:
                    on_exit(job, rc, time.monotonic() - r.started)
                if stop_after and stop_after(rc):
                    halted = True
    except KeyboardInterrupt:
        # A job on this terminal got the Ctrl-C already; one in its own session (with a log) has not.
        _signal_all({n: jr for n, jr in running.items() if jr[0].log is not None}, signal.SIGINT)
        for name, (_, r) in running.items():
            codes[name] = r.proc.wait()
    for job in pending:
        codes.setdefault(job.name, -1)
    return codes


def _start(job: Job, *, cpus: set[int] | None) -> subprocess.Popen:
    def pin() -> None:  # in the child, before exec: every thread it starts inherits the mask
        if cpus:
            os.sched_setaffinity(0, cpus)

    if job.log is None:
        return subprocess.Popen(job.argv, env=job.env, preexec_fn=pin if cpus else None)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "ab") as f:
        # Its own session, so a deadline's SIGTERM reaches the whole member (runner and training child).
        return subprocess.Popen(
            job.argv, stdout=f, stderr=subprocess.STDOUT, env=job.env, start_new_session=True, preexec_fn=pin
        )


def _signal_all(running: dict[str, tuple[Job, _Running]], sig: int) -> None:
    for job, r in running.values():
        try:
            if job.log is None:
                r.proc.send_signal(sig)
            else:
                os.killpg(r.proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait_group(pgid: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(POLL_S)


def last_progress(log: Path, *, tail_bytes: int = 4096) -> str:
    """The newest "step N/M | ... | error E% | ..." of a training log, shortened to "step N/M, error E%"; "" when
    there is none yet (the member is still starting)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "| error " in line and " step " in line:
            parts = [p.strip() for p in line.split("|")]
            step = parts[0].rsplit(" ", 1)[-1]
            error = next((p for p in parts if p.startswith("error ")), "")
            return f"step {step}, {error}" if error else f"step {step}"
    return ""
