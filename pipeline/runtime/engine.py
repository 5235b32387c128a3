"""DeepSpeed engine construction: optimizer param groups, the DeepSpeed config dict, precision.

Facts that shaped this (measured on one H100, ResNet-50, recorded in benchmarks/RESULTS.md):
- bf16 goes through DeepSpeed's ``torch_autocast`` section (fp32 master weights): 3,496 img/s, versus
  2,170 img/s for the ``bf16`` section (bf16 weights) and 2,300 img/s for an outer torch.autocast,
  which the engine silently disables.
- channels_last must be applied after ``deepspeed.initialize``: its parameter broadcast views
  tensors as bytes and fails on non-contiguous strides.
- SGD is "untested" for ZeRO in DeepSpeed's eyes, so ZeRO-1 needs ``zero_allow_untested_optimizer``.

The fast path (bf16, channels_last, cudnn.benchmark, fused SGD, torch.compile) is the default on GPUs:
every such config value may be "auto", which :func:`resolve_fast_path` turns into the fast choice when
the device is CUDA and into the plain one otherwise. ``benchmarks/throughput.py`` measures each switch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from pipeline.config import DistributedConfig, OptimConfig, PrecisionConfig, param_value


def param_groups(model: nn.Module, *, weight_decay: float, no_decay_bn_bias: bool) -> list[dict[str, Any]]:
    """Two groups when BN/bias are exempt from decay (1-D tensors are exactly those in a ResNet)."""
    if not no_decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class FastPath:
    """One engine's speed settings with every "auto" resolved for its device."""

    dtype: Literal["fp32", "bf16"]
    channels_last: bool
    compile: Literal["off", "module", "engine"]
    compile_mode: str
    compile_backend: str
    fused_sgd: bool
    cudnn_benchmark: bool

    def as_params(self) -> dict[str, str]:
        return {f"fast.{k}": param_value(v) for k, v in dataclasses.asdict(self).items()}

    def compile_kwargs(self) -> dict[str, Any]:
        # dynamic=False: a new batch size (the last val batch) gets its own static graph instead of turning
        # the batch dimension symbolic for every later call.
        kwargs: dict[str, Any] = {"dynamic": False}
        if self.compile_mode != "default":
            kwargs["mode"] = self.compile_mode
        return kwargs


def _on(value: bool | str, cuda: bool) -> bool:
    return cuda if value == "auto" else bool(value)


def resolve_fast_path(
    *,
    device: torch.device | str,
    dtype: str = "auto",
    channels_last: bool | str = "auto",
    compile: str = "auto",
    compile_mode: str = "default",
    compile_backend: str = "inductor",
    fused: bool | str = "auto",
    cudnn_benchmark: bool | str = "auto",
) -> FastPath:
    """Resolve "auto" settings: the fast choice with CUDA, the plain one without (CPU runs stay eager fp32)."""
    cuda = torch.device(device).type == "cuda"
    resolved_dtype = ("bf16" if cuda else "fp32") if dtype == "auto" else dtype
    if resolved_dtype not in ("fp32", "bf16"):
        raise ValueError(f"precision.dtype = {dtype!r}: allowed 'fp32', 'bf16', 'auto'")
    # "engine" over "module": both compile the same module in place (nn.Module.compile), but DeepSpeed's
    # engine.compile() is its supported route and keeps the engine aware that its module is compiled.
    resolved_compile = ("engine" if cuda else "off") if compile == "auto" else compile
    if resolved_compile not in ("off", "module", "engine"):
        raise ValueError(f"model.compile = {compile!r}: allowed 'auto', 'off', 'module', 'engine'")
    return FastPath(
        dtype=resolved_dtype,
        channels_last=_on(channels_last, cuda),  # type: ignore[arg-type]
        compile=resolved_compile,
        compile_mode=compile_mode,  # type: ignore[arg-type]
        compile_backend=compile_backend,
        fused_sgd=_on(fused, cuda),
        cudnn_benchmark=_on(cudnn_benchmark, cuda) and cuda,
    )


def deepspeed_config(
    *, precision: PrecisionConfig, distributed: DistributedConfig, grad_clip: float, micro_batch: int, world_size: int
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": distributed.grad_accum,
        "train_batch_size": micro_batch * distributed.grad_accum * world_size,
        "zero_optimization": {"stage": distributed.zero_stage},
        "zero_allow_untested_optimizer": True,
        # The trainer prints its own progress; DeepSpeed's periodic prints would interleave across ranks.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # The trainer measures throughput itself; DeepSpeed's throughput timer synchronises the device at the
        # start of every forward and at every step (2 host syncs per step, measured on the H100).
        "timers": {"throughput": {"enabled": False}},
    }
    # Always explicit: DeepSpeed's default is 1.0, so leaving the key out would clip every run's gradient norm
    # at 1 (and compute that norm every step); 0 turns clipping off.
    cfg["gradient_clipping"] = grad_clip if grad_clip > 0 else 0.0
    if precision.dtype == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


class TrainingEngine(Protocol):
    """What the trainer and the run use of the DeepSpeed engine :func:`build_engine` returns."""

    module: nn.Module  # the wrapped model
    optimizer: torch.optim.Optimizer  # the SGD the engine steps
    global_steps: int  # optimizer steps taken
    fast_path: FastPath  # set by build_engine

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def gradient_accumulation_steps(self) -> int: ...

    def train_batch_size(self) -> int: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...


def build_engine(
    model: nn.Module,
    *,
    optim: OptimConfig,
    precision: PrecisionConfig,
    distributed: DistributedConfig,
    lr: float,
    micro_batch: int,
    world_size: int,
    device: torch.device,
    channels_last: bool | str = False,
    compile: str = "off",
    compile_mode: str = "default",
    compile_backend: str = "inductor",
) -> TrainingEngine:
    """Wrap ``model`` in a DeepSpeed engine with SGD; returns the engine (its ``.optimizer`` is the SGD).

    ``engine.fast_path`` records the resolved :class:`FastPath`. The config's "auto" values may be passed
    as they are (``precision.dtype``, ``optim.fused`` and ``precision.cudnn_benchmark`` are read here).
    """
    import deepspeed  # heavy (CUDA extensions, seconds): only the paths that build an engine import it

    device = torch.device(device)
    fast = resolve_fast_path(
        device=device,
        dtype=precision.dtype,
        channels_last=channels_last,
        compile=compile,
        compile_mode=compile_mode,
        compile_backend=compile_backend,
        fused=optim.fused,
        cudnn_benchmark=precision.cudnn_benchmark,
    )
    if fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if fast.compile == "module":
        # In place (not torch.compile(model)), so parameter names, state_dict keys and checkpoints are
        # those of an uncompiled run.
        model.compile(backend=fast.compile_backend, **fast.compile_kwargs())
    groups = param_groups(model, weight_decay=optim.weight_decay, no_decay_bn_bias=optim.no_decay_bn_bias)
    sgd_kwargs: dict[str, Any] = {"lr": lr, "momentum": optim.momentum, "nesterov": optim.nesterov}
    if fast.fused_sgd:
        sgd_kwargs["fused"] = True  # one kernel for the whole update instead of one per tensor
    sgd = torch.optim.SGD(groups, **sgd_kwargs)
    config = deepspeed_config(
        precision=dataclasses.replace(precision, dtype=fast.dtype),
        distributed=distributed,
        grad_clip=optim.grad_clip,
        micro_batch=micro_batch,
        world_size=world_size,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=config)
    if fast.channels_last:
        engine.module.to(memory_format=torch.channels_last)
    if fast.compile == "engine":
        engine.compile(backend=fast.compile_backend, compile_kwargs=fast.compile_kwargs())
    if world_size == 1 and distributed.zero_stage == 0:
        # Averaging over one rank is the identity, but DeepSpeed would still flatten every gradient, reduce
        # and copy each one back: a few hundred small kernels per step, which small nets notice.
        engine.enable_backward_allreduce = False
    engine.fast_path = fast
    return engine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
