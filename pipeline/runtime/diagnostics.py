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
  conv, before the addition and ReLU, measured with forward hooks in eval mode (running statistics, no update)
  on one fixed, class-stratified set of validation images (``pipeline.data.measurement_batch``: the first files
  of every class, the same for every net; the first validation batch in file order would be one class). Two
  stds per layer: over all N*C*H*W elements of the response (``layers``), and per channel, then averaged over
  the channels (``per_channel``). The paper's Figure 7 is believed to be the first: it speaks of "the std of
  the layer responses" with no per-channel step, and the simple reading of a Caffe blob is its std over every
  element; it includes the spread between channels' BN offsets, which the per-channel one leaves out. For
  bottleneck blocks the branch output (``bn3``, which meets the addition) is recorded too (``branch``),
  beside the middle 3x3's BN. Measured at every evaluation, every ``response_std_every`` steps, at the
  ``response_std_steps`` and at the end, each logged at its step as per-stage means (``response_std/<stage>``,
  ``response_std_channel/<stage>``, ``response_std_branch/<stage>``: one line per stage in MLflow), and written
  as ``diagnostics/response_std.json`` at the end (``response_std_step<N>.json`` at a chosen step).

Both only read the model: training with them is bitwise the training without them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


def branch_layers(module: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BN at the end of each bottleneck's branch (``bn3``, the response that meets the addition), in layer
    order; a basic block's last BN is a 3x3 layer's, already in :func:`response_layers`."""
    threes = {id(bn) for _, bn in response_layers(module)}
    out = []
    for prefix, m in module.named_modules():
        last = getattr(m, "last_bn", None)
        bn = last() if callable(last) else None
        if isinstance(bn, nn.BatchNorm2d) and id(bn) not in threes:
            name = next(n for n, child in m.named_children() if child is bn)
            out.append((f"{prefix}.{name}", bn))
    return out


@dataclass
class ResponseStats:
    """Figure 7's numbers at one measurement: layer name -> std, in layer order."""

    layers: dict[str, float]  # over all N*C*H*W elements of the response (the paper's, see the module docstring)
    per_channel: dict[str, float]  # per channel over N*H*W, then averaged over the channels
    branch: dict[str, float] = field(default_factory=dict)  # bottleneck branch outputs (bn3), over all elements

    def as_json(self, step: int) -> str:
        return json.dumps(
            {"step": step, "layers": self.layers, "per_channel": self.per_channel, "branch": self.branch}, indent=1
        )


class _Moments:
    """Per-channel sums of x and x^2 in float64 over the chunks of a measurement, for both stds at once."""

    def __init__(self) -> None:
        self.n = 0  # elements per channel
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, out: torch.Tensor) -> None:
        x = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
        s1, s2 = x.sum(dim=1), x.square().sum(dim=1)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[1]

    def stds(self) -> torch.Tensor:
        """(std over all elements, mean over channels of each channel's std), unbiased as torch.std."""
        assert self.s1 is not None and self.s2 is not None
        total = self.n * self.s1.numel()
        var_all = (self.s2.sum() - self.s1.sum() ** 2 / total) / (total - 1)
        var_ch = (self.s2 - self.s1**2 / self.n) / (self.n - 1)
        return torch.stack([var_all.clamp_min(0).sqrt(), var_ch.clamp_min(0).sqrt().mean()])


@torch.no_grad()
def response_std(module: nn.Module, images: torch.Tensor | Sequence[torch.Tensor]) -> ResponseStats:
    """Std of each 3x3 layer's response to ``images`` (one batch, or a sequence of chunks measured as one set),
    both ways (see :class:`ResponseStats`), and of each bottleneck branch's output, in eval mode.

    The hook reads the BN output as it is returned: the block then adds the shortcut to it in place, so the
    std must be taken there and then. Eval mode uses the running statistics and updates none of them; the
    module's mode is restored afterwards."""
    layers, branches = response_layers(module), branch_layers(module)
    moments = {name: _Moments() for name, _ in layers + branches}

    def hook(name: str):
        def read(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            moments[name].add(out)

        return read

    handles = [bn.register_forward_hook(hook(name)) for name, bn in layers + branches]
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    try:
        for chunk in [images] if isinstance(images, torch.Tensor) else images:
            # forward(), not __call__: a module compiled in place (nn.Module.compile) would run its graph, where
            # hooks added now mean a recompile; its submodules still run eagerly, hooks included.
            module.forward(chunk.to(device, non_blocking=True))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    names = [name for name, _ in layers + branches]
    values = torch.stack([moments[n].stds() for n in names]).tolist() if names else []
    got = dict(zip(names, values, strict=True))
    return ResponseStats(
        layers={n: got[n][0] for n, _ in layers},
        per_channel={n: got[n][1] for n, _ in layers},
        branch={n: got[n][0] for n, _ in branches},
    )


def stage_means(stds: dict[str, float], *, prefix: str = "response_std") -> dict[str, float]:
    """Mean response std per stage (``<prefix>/stem``, ``<prefix>/layer1``, ...): cheap metrics."""
    by_stage: dict[str, list[float]] = {}
    for name, v in stds.items():
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        by_stage.setdefault(stage, []).append(v)
    return {f"{prefix}/{k}": sum(v) / len(v) for k, v in by_stage.items()}


def response_metrics(stats: ResponseStats) -> dict[str, float]:
    """The per-stage means of every measure, as the metrics logged at the measurement's step."""
    return {
        **stage_means(stats.layers),
        **stage_means(stats.per_channel, prefix="response_std_channel"),
        **stage_means(stats.branch, prefix="response_std_branch"),
    }


class Diagnostics:
    """What ``cfg`` turns on, for one rank's trainer: gradient norms on every rank, response std on rank 0.
    ``measurement``: loads Figure 7's fixed image set (``pipeline.data.measurement_batch``), called once, on rank 0
    at its first measurement."""

    def __init__(
        self,
        cfg: DiagnosticsConfig,
        *,
        module: nn.Module,
        optimizer: Any = None,
        rank: int,
        out_dir: str | Path,
        measurement: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.module = module
        self.rank = rank
        self.out_dir = Path(out_dir)
        self.grad_norms = GradNorms(module, optimizer=optimizer) if cfg.grad_norms else None
        self._steps = set(cfg.response_std_steps)
        self._measurement = measurement
        self._chunks: list[torch.Tensor] | None = None
        self._measured: int | None = None  # the last step measured: one measurement per step

    def response_due(self, step: int, *, final: bool = False, evaluated: bool = False) -> bool:
        """Whether rank 0 measures now: at the end, after an evaluation, at a chosen step or every N steps."""
        if not (self.cfg.response_std and self.rank == 0):
            return False
        every = self.cfg.response_std_every
        return final or (
            step != self._measured and (evaluated or step in self._steps or (every > 0 and step % every == 0))
        )

    def fixed_chunks(self) -> list[torch.Tensor]:
        """The measurement images, loaded once and kept on the host in chunks of 256: the same images at every
        measurement, without holding ImageNet's 1,000 images on the device between measurements."""
        if self._chunks is None:
            if self._measurement is None:
                raise RuntimeError("Diagnostics(response_std) needs a measurement set: pass measurement=")
            self._chunks = [c.cpu() for c in self._measurement().split(256)]
        return self._chunks

    def measure_responses(self, *, step: int, final: bool) -> tuple[Path | None, dict[str, float]]:
        """Rank 0: Figure 7's numbers now; returns the file written (the final one as ``response_std.json``, a chosen
        step's as ``response_std_step<N>.json``, else None) and the per-stage metrics to log at ``step``."""
        stats = response_std(self.module, self.fixed_chunks())
        self._measured = step
        path = None
        if final or step in self._steps:
            name = Path(RESPONSE_STD_ARTIFACT).name if final else f"response_std_step{step}.json"
            path = self.out_dir / "diagnostics" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(stats.as_json(step))
        return path, response_metrics(stats)


def read_response_std(text: str, *, measure: str = "layers") -> dict[str, float]:
    """Layer name -> std from a ``response_std.json`` (in layer order): ``measure`` "layers" (over all elements,
    the paper's), "per_channel" or "branch" (absent in files written before they were recorded: empty)."""
    return dict(json.loads(text).get(measure, {}))
