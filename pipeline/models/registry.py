"""Model names of the depth study and how they map to `ModelSpec`s."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.models.flops import count_macs
from pipeline.models.resnet import ResNet
from pipeline.models.spec import ModelSpec

# Stages per depth, table 1 of the paper.
_IMAGENET_LAYERS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_IMAGENET_WIDTHS = (64, 128, 256, 512)

# Section 4.2: depth 6n+2, n basic blocks in each of 3 stages.
_CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
# The paper trains no plain 1202-layer net; a plain net that deep does not train.
_CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)
_CIFAR_WIDTHS = (16, 32, 64)

OVERRIDES = ("residual", "shortcut", "stride_in", "zero_init_residual", "bn_weight_init")


def _imagenet(depth: int, *, residual: bool) -> ModelSpec:
    block, layers = _IMAGENET_LAYERS[depth]
    return ModelSpec(
        block=block,  # type: ignore[arg-type]
        layers=layers,
        widths=_IMAGENET_WIDTHS,
        stem="imagenet",
        residual=residual,
        # The paper's default for its ImageNet tables (and torchvision's).
        shortcut="B" if residual else None,
        num_classes=1000,
    )


def _cifar(depth: int, *, residual: bool) -> ModelSpec:
    n = (depth - 2) // 6
    return ModelSpec(
        block="basic",
        layers=(n, n, n),
        widths=_CIFAR_WIDTHS,
        stem="cifar",
        residual=residual,
        # The paper uses A on CIFAR so residual and plain nets have equal parameters.
        shortcut="A" if residual else None,
        num_classes=10,
    )


_REGISTRY: dict[str, ModelSpec] = {
    **{f"resnet{d}": _imagenet(d, residual=True) for d in _IMAGENET_LAYERS},
    **{f"plain{d}": _imagenet(d, residual=False) for d in _IMAGENET_LAYERS},
    **{f"cifar_resnet{d}": _cifar(d, residual=True) for d in _CIFAR_DEPTHS},
    **{f"cifar_plain{d}": _cifar(d, residual=False) for d in _CIFAR_PLAIN_DEPTHS},
}

# The family's shortcut, used when a plain entry is overridden to residual=True.
_DEFAULT_SHORTCUT = {"imagenet": "B", "cifar": "A"}


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_spec(name: str, *, num_classes: int | None = None, **overrides: Any) -> ModelSpec:
    """The spec `build_model(name, ...)` would build; raises ValueError on bad input.

    `residual` and `shortcut` move together: residual=False drops the shortcut,
    and turning a plain entry residual picks the family's default shortcut
    unless one is given.
    """
    try:
        spec = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(_REGISTRY)}") from None
    for key in overrides:
        if key not in OVERRIDES:
            raise ValueError(
                f"unknown override {key!r} for model {name!r}; allowed overrides: "
                f"{', '.join(OVERRIDES)} (and num_classes)"
            )
    changes = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    residual = changes.get("residual", spec.residual)
    if "shortcut" not in changes:
        if residual is False:
            changes["shortcut"] = None
        elif residual is True and spec.shortcut is None:
            changes["shortcut"] = _DEFAULT_SHORTCUT[spec.stem]
    return dataclasses.replace(spec, **changes)


def build_model(name: str, *, num_classes: int | None = None, **overrides: Any) -> ResNet:
    """Build a registered network.

    num_classes defaults to 1000 for ImageNet networks and 10 for CIFAR ones.
    overrides: residual (bool), shortcut ("A" | "B" | "C"), stride_in
    ("3x3" | "1x1", bottlenecks only), zero_init_residual (bool), bn_weight_init
    ("ones" | "uniform" | "uniform_residual").
    """
    return ResNet(model_spec(name, num_classes=num_classes, **overrides))


def train_flops_per_image(name: str, *, image_size: int, num_classes: int, **overrides: Any) -> float:
    """Training FLOPs of one image for model ``name``: 3 x the forward (the backward is about 2 x the forward),
    2 FLOPs per multiply-add. Counted on the meta device: no arithmetic, no memory."""
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, **overrides)
    return 6.0 * count_macs(model, (3, image_size, image_size))
