"""Start-up cost: a CPU run compiles nothing before its first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_START = """
import json, sys, torch
from pipeline.config import DistributedConfig
from pipeline.core.distributed import close_distributed, init_distributed
import deepspeed.comm as ds_comm

env = init_distributed(DistributedConfig(backend="gloo", timeout_s=60))
t = torch.ones(3)
ds_comm.all_reduce(t)  # DeepSpeed's comm layer works on the group it adopted
print(json.dumps({"backend": env.backend, "shm_op": ds_comm.comm.cdb.shm_comm_op is not None, "sum": t.tolist()}))
close_distributed()
"""


def test_cpu_process_group_starts_without_building_deepspeed_ops(tmp_path: Path) -> None:
    """DeepSpeed's CPU comm backend would JIT-compile its shared-memory op (g++, 35-180 s) into
    TORCH_EXTENSIONS_DIR; init_distributed keeps it from doing so, and the folder stays untouched."""
    ext = tmp_path / "torch_extensions"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        TORCH_EXTENSIONS_DIR=str(ext),
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", _START], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"backend": "gloo", "shm_op": False, "sum": [1.0, 1.0, 1.0]}
    assert not ext.exists(), sorted(p.name for p in ext.rglob("*"))
    assert "deepspeed_shm_comm" not in res.stdout + res.stderr
    assert took < 60, f"{took:.0f} s to start a process group (a compile?)"
