"""One generic ResNet / plain network, built entirely from a `ModelSpec`.

Covers both the ImageNet networks (7x7 stem + max-pool, 4 stages) and the
CIFAR-10 networks of section 4.2 (3x3 stem, 3 stages of 16/32/64 filters).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.blocks import BasicBlock, Bottleneck, make_shortcut
from pipeline.models.spec import ModelSpec

_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """conv1 -> bn1 -> relu -> maxpool -> layer1..layerN -> avgpool -> fc.

    `spec` is kept on the model so trainers and trackers can read depth,
    residual and shortcut from the model they were handed.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        block = _BLOCKS[spec.block]
        stem_width = spec.widths[0]
        if spec.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
            # An Identity instead of a branch in forward() keeps one forward for
            # both stems; it has no state, so CIFAR state dicts are unaffected.
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        inplanes = stem_width
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(spec.layers)))
        for i, (name, blocks, width) in enumerate(zip(self.stage_names, spec.layers, spec.widths, strict=True)):
            # Both papers' layouts halve the resolution at the start of every
            # stage except the first (the stem has already downsampled).
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                out_planes = width * block.expansion
                block_stride = stride if j == 0 else 1
                kwargs = {"stride_in": spec.stride_in} if block is Bottleneck else {}
                stage.append(
                    block(
                        inplanes,
                        width,
                        stride=block_stride,
                        residual=spec.residual,
                        downsample=make_shortcut(inplanes, out_planes, stride=block_stride, shortcut=spec.shortcut),
                        **kwargs,
                    )
                )
                inplanes = out_planes
            setattr(self, name, nn.Sequential(*stage))

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers"), as the ResNet paper
        # says; fan_out matches torchvision. fc keeps PyTorch's default init,
        # as torchvision does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                if self.spec.bn_weight_init == "uniform":
                    nn.init.uniform_(m.weight)
                else:
                    nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.spec.bn_weight_init == "uniform_residual":
            # The CIFAR paper configs: with every gamma at 1 the residual stream of a deep net sums many
            # unit-variance branches, so the pooled features are large and lr 0.1 overshoots the FC layer in
            # the first steps (ResNet-56's loss spikes to 5-6 and sits near chance for ~100 steps,
            # benchmarks/RESULTS.md). U[0, 1) gammas (mean square 1/3) on the BN that closes each branch
            # shrink what every block adds. Only that BN: the others are normalised again by the next BN,
            # and a plain net has no branch, so it starts (and draws its random numbers) exactly as "ones".
            for block in self.blocks():
                if block.residual:
                    nn.init.uniform_(block.last_bn().weight)
        if self.spec.zero_init_residual:
            # Each residual block then starts as the identity (Goyal et al. 2017),
            # which eases large-batch training of the deepest nets.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        return [b for name in self.stage_names for b in getattr(self, name)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)
