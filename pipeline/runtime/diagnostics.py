"""The paper's own diagnostics (He et al. 2015, section 4.1 and Figure 7), measured on a training run.

The paper argues that the degradation of deep plain nets is not vanishing signals: with BN, forward responses
keep non-zero variance and backward gradients "exhibit healthy norms". Two measurements let a run check it:

- per-stage gradient norms (``grad_norm/stem``, ``grad_norm/layer1`` .. ``grad_norm/layerN``, ``grad_norm/fc``):
  the norm of the gradient the optimizer is about to apply, read right after the backward of an accumulation
  boundary, only at steps that log, left on the device and summed with the metrics the trainer already reduces
  there. ZeRO-0 averages every gradient in place in the module's ``.grad`` (each rank holds all of it); ZeRO-1
  moves them into its optimizer's partitions (``.grad`` is None by then), one slice per rank, which are read
  there instead;
- Figure 7: the standard deviation of each 3x3 layer's response, the output of the BN that follows the 3x3
  conv, before the addition and ReLU, on one fixed validation batch (the first of rank 0's shard), measured
  with forward hooks in eval mode (running statistics, no update), written as ``diagnostics/response_std.json``
  (layer name -> std, in layer order).

Both only read the model: training with them is bitwise the training without them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import DiagnosticsConfig

log = logging.getLogger("pipeline.diagnostics")

RESPONSE_STD_ARTIFACT = "diagnostics/response_std.json"  # where the report looks for Figure 7's numbers


def stage_groups(module: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Trainable parameters by stage: ``stem`` (everything before the first stage), the model's stages
    (``stage_names``: layer1..layerN, the paper's conv2_x.. or the three CIFAR stages), then ``fc`` (the rest)."""
    stages = tuple(getattr(module, "stage_names", ()))
    groups: dict[str, list[nn.Parameter]] = {"stem": [], **{s: [] for s in stages}, "fc": []}
    seen_stage = False
    for name, child in module.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if name in stages:
            seen_stage = True
            groups[name] += params
        else:
            groups["fc" if seen_stage else "stem"] += params
    return [(k, v) for k, v in groups.items() if v]


def _zero_partitions(optimizer: Any) -> bool:
    """A DeepSpeed ZeRO-1/2 optimizer, which keeps the reduced gradients in per-rank partitions (DeepSpeed 0.19's
    DeepSpeedZeroOptimizer: ``averaged_gradients[group]`` lists the gradients of ``params_in_partition[group]``)."""
    return hasattr(optimizer, "averaged_gradients") and hasattr(optimizer, "params_in_partition")


class GradNorms:
    """Squared gradient norms per stage of ``module``, as one float64 device tensor (no host sync)."""

    def __init__(self, module: nn.Module, *, optimizer: Any = None) -> None:
        groups = stage_groups(module)
        self.names = [f"grad_norm/{name}" for name, _ in groups]
        self._groups = [params for _, params in groups]
        self._optimizer = optimizer if _zero_partitions(optimizer) else None
        self._stage_of = {id(p): k for k, params in enumerate(self._groups) for p in params}
        self._device = next(module.parameters()).device

    @torch.no_grad()
    def squared(self) -> torch.Tensor:
        """Sum of squares of this rank's gradients in each stage (a parameter without a gradient counts 0)."""
        if self._optimizer is not None:
            return self._squared_partitions()
        out = []
        for params in self._groups:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                out.append(torch.zeros((), dtype=torch.float64, device=params[0].device))
                continue
            norms = torch._foreach_norm(grads)  # one kernel per group on CUDA, not one per tensor
            out.append(torch.stack(norms).double().square().sum())
        return torch.stack(out)

    def _squared_partitions(self) -> torch.Tensor:
        opt = self._optimizer
        out = torch.zeros(len(self._groups), dtype=torch.float64, device=self._device)
        for i, params in enumerate(opt.params_in_partition):
            grads = [g for g in (opt.averaged_gradients.get(i) or []) if not getattr(g, "_zero_padding", False)]
            # As DeepSpeed's own norm: the first gradient may be the tail of a parameter another rank starts.
            for g, p in zip(grads, params, strict=False):
                out[self._stage_of[id(p)]] += g.detach().double().square().sum()
        return out

    def finish(self, summed: list[float], *, world_size: int) -> dict[str, float]:
        """The norms from ``squared()`` summed over ranks. ZeRO-0: every rank holds the same averaged gradient,
        so the mean over ranks is its squared norm; ZeRO-1: the ranks' slices are disjoint, so the sum is."""
        share = 1 if self._optimizer is not None else world_size
        return {name: (v / share) ** 0.5 for name, v in zip(self.names, summed, strict=True)}


def response_layers(module: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BN that follows a 3x3 conv, in layer order: ``convK`` -> ``bnK`` pairs of the stem and of each
    block (the paper's 3x3 layers; a bottleneck's 1x1 convs and the 7x7 ImageNet stem are not 3x3)."""
    out = []
    for prefix, m in module.named_modules():
        for name, conv in m.named_children():
            if not (isinstance(conv, nn.Conv2d) and name.startswith("conv") and conv.kernel_size == (3, 3)):
                continue
            bn = getattr(m, "bn" + name.removeprefix("conv"), None)
            if isinstance(bn, nn.BatchNorm2d):
                out.append((f"{prefix}.{name}" if prefix else name, bn))
    return out


@torch.no_grad()
def response_std(module: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Std of each 3x3 layer's response to ``images`` (layer name -> std, in layer order), in eval mode.

    The hook reads the BN output as it is returned: the block then adds the shortcut to it in place, so the
    std must be taken there and then. Eval mode uses the running statistics and updates none of them; the
    module's mode is restored afterwards."""
    layers = response_layers(module)
    stds: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def read(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            stds[name] = out.float().std()

        return read

    handles = [bn.register_forward_hook(hook(name)) for name, bn in layers]
    was_training = module.training
    module.eval()
    try:
        # forward(), not __call__: a module compiled in place (nn.Module.compile) would run its graph, where hooks
        # added now mean a recompile; its submodules still run eagerly, hooks included.
        module.forward(images)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    values = torch.stack([stds[name] for name, _ in layers]).tolist() if layers else []
    return dict(zip([name for name, _ in layers], values, strict=True))


def stage_means(stds: dict[str, float]) -> dict[str, float]:
    """Mean response std per stage (``response_std/stem``, ``response_std/layer1``, ...): cheap metrics."""
    by_stage: dict[str, list[float]] = {}
    for name, v in stds.items():
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        by_stage.setdefault(stage, []).append(v)
    return {f"response_std/{k}": sum(v) / len(v) for k, v in by_stage.items()}


class Diagnostics:
    """What ``cfg`` turns on, for one rank's trainer: gradient norms on every rank, response std on rank 0."""

    def __init__(
        self, cfg: DiagnosticsConfig, *, module: nn.Module, optimizer: Any = None, rank: int, out_dir: str | Path
    ) -> None:
        self.cfg = cfg
        self.module = module
        self.rank = rank
        self.out_dir = Path(out_dir)
        self.grad_norms = GradNorms(module, optimizer=optimizer) if cfg.grad_norms else None
        self._steps = set(cfg.response_std_steps)
        self._batch: torch.Tensor | None = None

    def response_due(self, step: int, *, final: bool = False) -> bool:
        return self.cfg.response_std and self.rank == 0 and (final or step in self._steps)

    def fixed_batch(self, val_source: Any) -> torch.Tensor:
        """The first validation batch of this rank, kept: the same images at every measurement (a val source
        restarts its pass at each ``iter()``, so taking one batch leaves the next evaluation whole)."""
        if self._batch is None:
            images, _ = next(iter(val_source))
            self._batch = images.clone()
        return self._batch

    def measure_responses(self, val_source: Any, *, step: int, final: bool) -> tuple[Path, dict[str, float]]:
        """Rank 0: Figure 7's numbers now, written as JSON (the final one as ``response_std.json``, a chosen
        step's as ``response_std_step<N>.json``); returns the file and per-stage mean metrics."""
        stds = response_std(self.module, self.fixed_batch(val_source))
        name = Path(RESPONSE_STD_ARTIFACT).name if final else f"response_std_step{step}.json"
        path = self.out_dir / "diagnostics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, "layers": stds}, indent=1))
        return path, stage_means(stds)


def read_response_std(text: str) -> dict[str, float]:
    """Layer name -> std from a ``response_std.json`` (in layer order)."""
    return dict(json.loads(text)["layers"])
