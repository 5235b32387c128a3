"""The torchrun environment: who am I, which device, which backend.

Global rank drives sharding and every rank-0 duty; local rank only picks the GPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from pipeline.config import DistributedConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK... as torchrun sets them; a plain ``python`` run is a world of one."""
    if "RANK" not in os.environ:
        # Single process without torchrun: DeepSpeed still wants a process group.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", str(rank // max(local_world, 1)))))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    return DistEnv(rank, world, local_rank, local_world, node_rank, device, backend)


def init_distributed(cfg: DistributedConfig) -> DistEnv:
    """Create the process group through DeepSpeed (so its comm layer and ours agree)."""
    env = read_env()
    backend = env.backend if cfg.backend == "auto" else cfg.backend
    if backend == "nccl" and env.device.type != "cuda":
        from pipeline.config import ConfigError

        raise ConfigError("distributed.backend = 'nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU machines")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    else:
        # DeepSpeed picks its accelerator at import; without a GPU it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.timeout_s),
                               verbose=False)
    return DistEnv(env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
                   env.device, backend)


def close_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
