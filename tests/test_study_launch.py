"""pipeline.study.launch: members side by side, each on its own cores; a stopped member starts no other."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.study.launch import Job, last_progress, run_jobs

AFFINITY = "import json, os, time; print(json.dumps(sorted(os.sched_getaffinity(0)))); time.sleep(1)"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give two members one each")
def test_parallel_members_get_disjoint_cores_and_their_own_logs(tmp_path: Path) -> None:
    jobs = [Job(f"m{i}", [sys.executable, "-c", AFFINITY], log=tmp_path / f"m{i}.log") for i in range(2)]
    ended: list[str] = []
    codes = run_jobs(jobs, parallel=2, on_exit=lambda job, rc, s: ended.append(job.name))
    assert codes == {"m0": 0, "m1": 0} and sorted(ended) == ["m0", "m1"]
    cores = [set(json.loads((tmp_path / f"m{i}.log").read_text())) for i in range(2)]
    assert cores[0] and cores[1] and not cores[0] & cores[1], cores


def test_one_at_a_time_on_this_terminal_and_a_stop_starts_nothing_more(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        Job("first", [sys.executable, "-c", "print('first ran')"]),
        Job("stopped", [sys.executable, "-c", "raise SystemExit(75)"]),
        Job("never", [sys.executable, "-c", "print('never ran')"]),
    ]
    codes = run_jobs(jobs, parallel=1, stop_after=lambda rc: rc == 75)
    assert codes == {"first": 0, "stopped": 75, "never": -1}
    out = capfd.readouterr().out
    assert "first ran" in out and "never ran" not in out


def test_members_on_logs_are_reported_every_so_often(tmp_path: Path) -> None:
    """With members' output in log files, the terminal gets "running: plain56 step 170/440, error 75.62%" lines."""
    log = tmp_path / "plain56.log"
    line = (
        "2026-12-08 00:20:14,676 INFO pipeline.progress: step 170/440 | epoch 3.86 | loss 1.8512 | error 75.62% | "
        "167 img/s | data wait 1% | lr 0.025 | ETA 1m09s"
    )
    write = f"open({str(log)!r}, 'a').write({line!r} + '\\n'); import time; time.sleep(1.5)"
    seen: list[list[str]] = []
    run_jobs(
        [Job("plain56", [sys.executable, "-c", write], log=tmp_path / "runner.log")],
        parallel=1,
        every_s=0.5,
        on_tick=lambda running: seen.append([j.name for j in running]),
    )
    assert seen and all(names == ["plain56"] for names in seen)
    assert last_progress(log) == "step 170/440, error 75.62%"
    assert last_progress(tmp_path / "runner.log") == "" and last_progress(tmp_path / "missing.log") == ""
