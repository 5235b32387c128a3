"""The architecture of a ResNet or plain network as a plain, loggable value.

Everything that distinguishes the networks of the depth study lives in a
`ModelSpec`; `ResNet` is built from one and nothing else, so a run's tracking
tags can be read from the spec without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Block = Literal["basic", "bottleneck"]
Stem = Literal["imagenet", "cifar"]
Shortcut = Literal["A", "B", "C"]
StrideIn = Literal["3x3", "1x1"]
BnWeightInit = Literal["ones", "uniform", "uniform_residual"]

BLOCKS: tuple[Block, ...] = ("basic", "bottleneck")
STEMS: tuple[Stem, ...] = ("imagenet", "cifar")
SHORTCUTS: tuple[Shortcut, ...] = ("A", "B", "C")
STRIDE_INS: tuple[StrideIn, ...] = ("3x3", "1x1")
BN_WEIGHT_INITS: tuple[BnWeightInit, ...] = ("ones", "uniform", "uniform_residual")

# Convolutions on the residual branch of one block; the depth the paper quotes
# counts these plus the stem conv and the classifier.
_CONVS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
_INPUT_SIZE = {"imagenet": (3, 224, 224), "cifar": (3, 32, 32)}


def _choices(values: tuple[object, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def _check_choice(key: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {_choices(allowed)}")


def _check_bool(key: str, value: object) -> None:
    # `type(...) is bool` rather than isinstance: a config typo like `residual: 1`
    # should fail loudly instead of becoming a silently different experiment.
    if type(value) is not bool:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of True, False")


def _check_positive_ints(key: str, values: tuple[object, ...]) -> None:
    if not values or any(type(v) is not int or v < 1 for v in values):
        raise ValueError(f"{key}={values!r} is not allowed; expected a non-empty tuple of positive ints")


@dataclass(frozen=True)
class ModelSpec:
    """One network of the study.

    `widths` are the per-stage widths of the 3x3 convolutions (torchvision's
    `planes`); a bottleneck stage outputs 4x that. The stem outputs `widths[0]`.
    `shortcut` is None exactly when `residual` is False: plain networks have no
    shortcut of any kind. `stride_in` says which conv of a bottleneck carries the
    stage's stride ("3x3": torchvision v1.5, "1x1": the 2015 paper); basic
    blocks only have "3x3".
    """

    block: Block
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem: Stem
    residual: bool
    shortcut: Shortcut | None
    stride_in: StrideIn = "3x3"
    zero_init_residual: bool = False
    # How every BN's scale (gamma) starts: "ones" (torchvision, Caffe's Scale layer, PyTorch >= 1.2) or
    # "uniform", U[0, 1) (PyTorch before 1.2), or "uniform_residual": U[0, 1) only for the last BN of every
    # residual branch, the one whose output is added to the stream (a plain net starts as with "ones").
    # See ResNet._init_weights for why it matters on CIFAR.
    bn_weight_init: BnWeightInit = "ones"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        # Lists from TOML configs are accepted but stored as tuples so the
        # spec stays hashable and comparable.
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "widths", tuple(self.widths))
        _check_choice("block", self.block, BLOCKS)
        _check_choice("stem", self.stem, STEMS)
        _check_positive_ints("layers", self.layers)
        _check_positive_ints("widths", self.widths)
        if len(self.layers) != len(self.widths):
            raise ValueError(f"layers={self.layers!r} and widths={self.widths!r} must have the same length")
        _check_bool("residual", self.residual)
        _check_bool("zero_init_residual", self.zero_init_residual)
        _check_choice("stride_in", self.stride_in, STRIDE_INS)
        _check_choice("bn_weight_init", self.bn_weight_init, BN_WEIGHT_INITS)
        if type(self.num_classes) is not int or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} is not allowed; expected a positive int")
        if self.residual:
            _check_choice("shortcut", self.shortcut, SHORTCUTS)
        elif self.shortcut is not None:
            raise ValueError(
                f"shortcut={self.shortcut!r} is not allowed with residual=False; "
                "a plain network has no shortcut (shortcut must be None)"
            )
        if self.block == "basic" and self.stride_in != "3x3":
            raise ValueError(
                f"stride_in={self.stride_in!r} is not allowed for basic blocks; "
                "choose one of '3x3' (stride_in '1x1' needs block='bottleneck')"
            )
        if self.zero_init_residual and not self.residual:
            # Zeroing the last BN of a block that has no identity path would
            # zero the whole network's signal, not just start blocks at identity.
            raise ValueError("zero_init_residual=True is not allowed with residual=False; choose one of False")

    @property
    def depth(self) -> int:
        return _CONVS_PER_BLOCK[self.block] * sum(self.layers) + 2

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Default (C, H, W) of one image: what the network is meant to be trained at."""
        return _INPUT_SIZE[self.stem]

    def tags(self) -> dict[str, str]:
        """Flat string tags for experiment tracking (MLflow tags must be strings)."""
        return {
            "depth": str(self.depth),
            "block": self.block,
            "layers": "-".join(str(n) for n in self.layers),
            "stem": self.stem,
            "residual": str(self.residual).lower(),
            "shortcut": self.shortcut or "none",
            "stride_in": self.stride_in,
            "zero_init_residual": str(self.zero_init_residual).lower(),
            "bn_weight_init": self.bn_weight_init,
        }
