"""How many CPU threads a process uses: sized from the cores it really has, not from the machine.

torch's intra-op pool defaults to every core of the machine, and DALI's CPU threads (``data.num_threads``) come
on top. On a 2-core machine that oversubscribes: training measured 10-29 img/s on every data path with torch's
default, 83-144 with one torch thread (benchmarks/RESULTS.md). The cores a process has are its CPU affinity
(what SLURM's cgroup, ``taskset`` or ``pipeline.study --parallel`` gave it), shared by the ranks on its node.
An ``OMP_NUM_THREADS`` the user set always wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def core_ids() -> list[int]:
    """The cores this process may run on: its affinity mask, or every core of the machine where there is none."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity mask
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(core_ids())


@dataclass(frozen=True)
class ThreadPlan:
    torch: int  # torch intra-op threads of each rank
    data: int  # DALI CPU threads of each rank
    cores: int  # the cores this rank's share is taken from
    ranks: int  # ranks sharing them
    from_env: bool  # OMP_NUM_THREADS set by the user: torch's count is theirs

    def __str__(self) -> str:
        why = "OMP_NUM_THREADS" if self.from_env else f"{self.cores} core(s) for {self.ranks} rank(s)"
        return f"{self.torch} torch thread(s), {self.data} DALI thread(s) per rank ({why})"


def plan_threads(*, data_threads: int, ranks_here: int, cores: int | None = None) -> ThreadPlan:
    """Threads for one rank of ``ranks_here`` on this node when it trains on the CPU.

    Each rank gets an equal share of the cores; torch keeps one core of that share free for the data pipeline
    (DALI's threads, the loader, the metric and progress threads), and DALI never gets more threads than the
    share. A user's ``OMP_NUM_THREADS`` sets torch's count as given."""
    cores = usable_cores() if cores is None else cores
    share = max(1, cores // max(1, ranks_here))
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    from_env = env.isdigit() and int(env) > 0
    torch_threads = int(env) if from_env else max(1, share - 1)
    return ThreadPlan(torch_threads, max(1, min(data_threads, share)), cores, max(1, ranks_here), from_env)


def cpu_slots(parallel: int, *, cores: list[int] | None = None) -> list[set[int]]:
    """``parallel`` disjoint sets of this process's cores, as equal as they can be (one core each at least;
    with more processes than cores, slots share cores round-robin)."""
    cores = core_ids() if cores is None else cores
    n = max(1, parallel)
    if n >= len(cores):
        return [{cores[i % len(cores)]} for i in range(n)]
    size, extra = divmod(len(cores), n)
    slots, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        slots.append(set(cores[start:end]))
        start = end
    return slots
