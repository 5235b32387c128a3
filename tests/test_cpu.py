"""pipeline.core.cpu: threads sized from the cores a process has, and the cores a study's members get."""

from __future__ import annotations

import pytest

from pipeline.core.cpu import cpu_slots, plan_threads


@pytest.mark.parametrize(
    "cores, ranks, data, torch_threads, dali_threads",
    [
        (2, 1, 2, 1, 2),  # this machine: one core left to the data pipeline (1 torch thread measured fastest)
        (1, 1, 4, 1, 1),  # a member pinned to one core: never more DALI threads than cores
        (16, 8, 2, 1, 2),  # eight ranks share a node
        (16, 1, 2, 15, 2),
    ],
)
def test_threads_come_from_this_ranks_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, ranks: int, data: int, torch_threads: int, dali_threads: int
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = plan_threads(data_threads=data, ranks_here=ranks, cores=cores)
    assert (plan.torch, plan.data) == (torch_threads, dali_threads)
    assert f"{cores} core(s) for {ranks} rank(s)" in str(plan)


def test_the_users_omp_num_threads_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    plan = plan_threads(data_threads=2, ranks_here=1, cores=2)
    assert plan.torch == 3 and "OMP_NUM_THREADS" in str(plan)


def test_slots_split_the_cores_without_overlap() -> None:
    assert cpu_slots(2, cores=[0, 1]) == [{0}, {1}]
    assert cpu_slots(3, cores=list(range(8))) == [{0, 1, 2}, {3, 4, 5}, {6, 7}]
    assert cpu_slots(4, cores=[0, 1]) == [{0}, {1}, {0}, {1}]  # more members than cores: they share
