"""The torchrun environment (who am I, which device, which backend) and the collectives the pipeline
makes outside the engine: starting the process group, broadcasting or gathering small Python objects,
barriers, a CPU side group for control messages, and summing metric tensors.

Global rank drives sharding and every rank-0 duty; local rank only picks the GPU. Every helper is a
no-op (returning its input) when there is no process group or a world of one, so single-process runs
and tests need no special cases.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from pipeline.core.errors import ConfigError, UserError

T = TypeVar("T")


class DistributedSettings(Protocol):
    """What ``init_distributed`` reads of the config's ``distributed`` section (``pipeline.config``'s
    ``DistributedConfig``), so that core needs no config."""

    @property
    def backend(self) -> str: ...

    @property
    def timeout_s(self) -> float: ...


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


# What a collective raises on the ranks that are left when another rank's process has died (gloo's TCP pairs,
# NCCL's abort on a dead peer, the c10d store's connection).
_PEER_DEATH = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
)


class PeerDied(RuntimeError):
    """A collective failed because another rank's process ended: this rank's failure follows that one."""


def peer_died(e: BaseException) -> PeerDied | None:
    """``e`` restated as PeerDied when it is a collective's failure caused by another rank's death, else None; the
    message says so, so that the log of a node whose ranks only followed a crash points at the first failure."""
    if isinstance(e, PeerDied):
        return e
    if isinstance(e, UserError) or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    network_error = getattr(dist, "DistNetworkError", ())
    if not (any(p in text for p in _PEER_DEATH) or (network_error and isinstance(e, network_error))):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    return PeerDied(
        f"a peer died: another rank's process ended and this rank's collective failed ({first[:200]}); this rank "
        f"did not fail first: the log of the node that failed first names the cause"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK... as torchrun sets them; a plain ``python`` run is a world of one."""
    if "RANK" not in os.environ:
        # Single process without torchrun: DeepSpeed still wants a process group.
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
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


def init_distributed(cfg: DistributedSettings) -> DistEnv:
    """Create the process group through DeepSpeed (so its comm layer and ours agree); training and
    evaluation both start here."""
    env = read_env()
    backend = env.backend if cfg.backend == "auto" else cfg.backend
    if backend == "nccl" and env.device.type != "cuda":
        raise ConfigError("distributed.backend = 'nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU machines")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    else:
        # DeepSpeed picks its accelerator at import; without a GPU it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # heavy, and must come after DS_ACCELERATOR is set: only starting a process group needs it

    skip_shm_comm_build()

    timeout = timedelta(seconds=cfg.timeout_s)
    if env.world_size == 1 and not dist.is_initialized():
        # A world of one needs no rendezvous: an in-memory store instead of the TCP store, whose port another
        # process can take between read_env choosing it and the bind (EADDRINUSE at start-up). DeepSpeed adopts
        # a process group that already exists.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    return DistEnv(env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.device, backend)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op when the process group starts.

    With the CPU accelerator, DeepSpeed's torch comm backend compiles ``deepspeed_shm_comm`` with g++ (35-180 s per
    machine and per build folder) whenever the op is marked compatible. Only ``inference_all_reduce`` (tensor-parallel
    inference) uses it; training reduces through torch.distributed (gloo), so nothing is lost by marking it
    unavailable. DeepSpeed keeps that table in one module-level dict, probed once, so the edit holds.
    (The CUDA accelerator has no such op: GPU runs build nothing at start.)
    """
    import deepspeed.ops  # heavy: only starting a process group needs it

    table = getattr(deepspeed.ops, "__compatible_ops__", None)  # DeepSpeed 0.19.8; another version may lack it
    if isinstance(table, dict):
        table["deepspeed_shm_comm"] = False


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Collectives. ``group=None`` is the default group; ``control_group()`` gives a CPU one.


def is_multi_rank() -> bool:
    """A process group with more than one rank exists: collectives have someone to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def control_group() -> Any:
    """A CPU (gloo) group over every rank, for small control collectives that must stay off the training
    stream (NCCL) and be cheap to poll; None when the default group is already gloo, or there is no
    group. A collective when it creates one: every rank calls it, in the same order."""
    if not is_multi_rank() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def broadcast_object(obj: T, *, group: Any = None) -> T:
    """Rank 0's ``obj`` on every rank (pickled; keep it small). A collective."""
    if not is_multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather_objects(obj: T, *, group: Any = None) -> list[T]:
    """Every rank's ``obj``, indexed by rank. A collective."""
    if not is_multi_rank():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(*, group: Any = None) -> None:
    if is_multi_rank():
        dist.barrier(group=group)


def all_reduce_sum(sums: torch.Tensor) -> torch.Tensor:
    """Sum ``sums`` over every rank, in place (metric sums: on the device, one collective); returns it."""
    if is_multi_rank():
        dist.all_reduce(sums)
    return sums


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``values`` over every rank, in place (one collective); returns it."""
    if is_multi_rank():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values
