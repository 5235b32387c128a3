"""Submitting and watching jobs on the test cluster (tests/cluster/slurm_cluster.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parent.parent.parent
T = TypeVar("T")


class Job:
    """A submitted batch job: its id and what ``scontrol show job`` says about it."""

    def __init__(self, cluster: SlurmCluster, job_id: str) -> None:
        self.cluster, self.id = cluster, job_id

    def info(self) -> dict[str, str]:
        r = self.cluster.run("scontrol", "-o", "show", "job", self.id, check=False, timeout=15)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait(self, states: set[str], timeout_s: float, *, what: str = "") -> dict[str, str]:
        """Poll until the job is in one of ``states``; the failure message carries the daemons' logs."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(
            f"job {self.id} not {'/'.join(sorted(states))} after {timeout_s:.0f}s {what}; "
            f"last state {info.get('JobState')} ({info.get('Reason')})\n{self.cluster.logs()}"
        )


def sbatch(cluster: SlurmCluster, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> Job:
    r = cluster.run("sbatch", "--parsable", *args, env=cluster.env(env), cwd=cwd, check=False)
    assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr}"
    return Job(cluster, r.stdout.strip().split(";")[0])


def wait_for(cond: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"
