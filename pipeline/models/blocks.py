"""Residual/plain building blocks and the three shortcut options of the paper.

Module names follow torchvision's `models/resnet.py` so its state dicts load
with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.spec import STRIDE_INS, Shortcut, StrideIn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias anywhere: every conv is followed by BN, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity that subsamples and zero-pads new channels.

    Parameter-free, so option-A networks have exactly the parameter count of
    their plain counterparts, which is what makes the paper's comparison fair.
    """

    def __init__(self, in_planes: int, out_planes: int, *, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A can only widen a shortcut; got {in_planes} -> {out_planes} channels")
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            # Sampling every stride-th pixel from the first lands on the same grid
            # as the branch's strided conv (padding 1 for 3x3, 0 for 1x1), for odd
            # sizes too, so the two paths always have the same spatial shape.
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


def make_shortcut(in_planes: int, out_planes: int, *, stride: int, shortcut: Shortcut | None) -> nn.Module | None:
    """The `downsample` of one block; None means identity (or, for plain nets, nothing)."""
    if shortcut is None:
        return None
    changes_shape = stride != 1 or in_planes != out_planes
    if shortcut == "C" or (shortcut == "B" and changes_shape):
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    if shortcut == "A" and changes_shape:
        return ZeroPadShortcut(in_planes, out_planes, stride=stride)
    return None


class _Block(nn.Module):
    """What both block types share: the optional shortcut and the final add-and-ReLU."""

    expansion = 1

    def __init__(self, *, stride: int, residual: bool, downsample: nn.Module | None) -> None:
        super().__init__()
        if downsample is not None and not residual:
            raise ValueError("a plain block (residual=False) cannot have a downsample shortcut")
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.stride = stride

    def _merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # `residual` is a Python bool fixed at construction, so a plain block
        # traces (torch.fx, torch.compile) to a graph with no addition at all.
        if self.residual:
            identity = x if self.downsample is None else self.downsample(x)
            out += identity
        return self.relu(out)


class BasicBlock(_Block):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, *, stride: int = 1, residual: bool = True, downsample: nn.Module | None = None
    ) -> None:
        super().__init__(stride=stride, residual=residual, downsample=downsample)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # registered last, as in torchvision, so state_dict keys keep its order

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._merge(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        residual: bool = True,
        downsample: nn.Module | None = None,
        stride_in: StrideIn = "3x3",
    ) -> None:
        super().__init__(stride=stride, residual=residual, downsample=downsample)
        if stride_in not in STRIDE_INS:
            raise ValueError(f"stride_in={stride_in!r} is not allowed; choose one of '3x3', '1x1'")
        # The 2015 paper strides the first 1x1 conv, which discards 3/4 of the
        # input activations before any 3x3 sees them; torchvision (v1.5) moves
        # the stride to the 3x3, which is slightly more accurate and costs more
        # multiply-adds because the first 1x1 then runs at full resolution.
        stride_1x1, stride_3x3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        self.conv1 = conv1x1(inplanes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._merge(self.bn3(self.conv3(out)), x)
