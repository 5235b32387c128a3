"""Model zoo of the depth study: ResNets and their plain counterparts.

build_model("resnet50")                      # torchvision-compatible (option B)
build_model("plain34")                       # no shortcuts, no additions
build_model("cifar_resnet110")               # section 4.2, option A
model_spec("resnet50", stride_in="1x1").tags()
"""

from pipeline.models.blocks import BasicBlock, Bottleneck, ZeroPadShortcut
from pipeline.models.flops import count_macs
from pipeline.models.registry import build_model, list_models, model_spec, train_flops_per_image
from pipeline.models.resnet import ResNet
from pipeline.models.spec import ModelSpec

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
    "train_flops_per_image",
]
