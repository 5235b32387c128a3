"""pipeline.core.distributed: the one home of the pipeline's collectives, on a real 2-process gloo group."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def test_object_broadcast_has_one_home() -> None:
    # The name is spelled in two pieces so that `git grep` for it lists the one call site only.
    call = re.compile(r"\b" + "broadcast_" + r"object_list\(")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "pipeline").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if call.search(line)
    ]
    assert len(hits) == 1 and hits[0].startswith("pipeline/core/distributed.py:"), hits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    # The same start as training and evaluation: torchrun's variables, then init_distributed.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    from pipeline.config import DistributedConfig
    from pipeline.core.distributed import (
        all_gather_objects,
        all_reduce_sum,
        barrier,
        broadcast_object,
        close_distributed,
        control_group,
        init_distributed,
        is_multi_rank,
    )
    from pipeline.runtime.metrics import MetricSums

    env = init_distributed(DistributedConfig(backend="gloo", timeout_s=60))
    try:
        side = torch.distributed.new_group(backend="gloo")
        sums = MetricSums(torch.device("cpu"))
        # rank 0: one right of one; rank 1: one right of two (top-1), all right in the top 5
        labels = torch.tensor([0] if rank == 0 else [0, 1])
        sums.update(torch.tensor(float(rank + 1)), torch.eye(3)[torch.zeros_like(labels)], labels)
        result = {
            "env": [env.rank, env.world_size, env.backend],
            "multi": is_multi_rank(),
            "control_group_on_gloo": control_group() is None,  # the default group already is one
            "bcast": broadcast_object({"root": f"/data/from-{rank}"} if rank == 0 else None),
            "bcast_side": broadcast_object(f"side-{rank}", group=side),
            "gather": all_gather_objects((rank, f"r{rank}")),
            "gather_side": all_gather_objects(rank * 10, group=side),
            "reduced": all_reduce_sum(torch.tensor([1.0, float(rank)])).tolist(),
            "metrics": sums.reduce(),
        }
        barrier()
        barrier(group=side)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        close_distributed()


def test_helpers_on_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["env"] == [rank, 2, "gloo"] and r["multi"] and r["control_group_on_gloo"]
        assert r["bcast"] == {"root": "/data/from-0"} and r["bcast_side"] == "side-0"
        assert r["gather"] == [[0, "r0"], [1, "r1"]] and r["gather_side"] == [0, 10]
        assert r["reduced"] == [2.0, 1.0]
        m = r["metrics"]  # 3 samples: losses 1 (x1) and 2 (x2); top-1 right for 2 of them
        assert m["count"] == 3 and abs(m["loss"] - 5 / 3) < 1e-9
        assert abs(m["top1_error"] - 100 / 3) < 1e-9 and m["top5_error"] == 0.0


def test_helpers_without_a_process_group() -> None:
    from pipeline.core.distributed import all_gather_objects, all_reduce_sum, barrier, broadcast_object, control_group

    assert not torch.distributed.is_initialized()
    assert broadcast_object("x") == "x" and all_gather_objects(3) == [3] and control_group() is None
    barrier()
    assert all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
