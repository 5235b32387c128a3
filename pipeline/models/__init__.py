"""Model zoo of the depth study: ResNets and their plain counterparts.

build_model("resnet50")                      # torchvision-compatible (option B)
build_model("plain34")                       # no shortcuts, no additions
build_model("cifar_resnet110")               # section 4.2, option A
model_spec("resnet50", stride_in="1x1").tags()
"""

from .blocks import BasicBlock, Bottleneck, ZeroPadShortcut
from .flops import count_macs
from .registry import build_model, list_models, model_spec
from .resnet import ResNet
from .spec import ModelSpec

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ModelSpec",
    "ResNet",
    "ZeroPadShortcut",
    "build_model",
    "count_macs",
    "list_models",
    "model_spec",
]
