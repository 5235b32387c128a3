"""Multiply-accumulate count of one forward pass.

The paper's "FLOPs" (3.6e9 for ResNet-34, 11.3e9 for ResNet-152) are
multiply-adds of the convolutions and the classifier, so that is what is
counted; BN, ReLU, pooling and the shortcut additions are left out, as there.
"""

from __future__ import annotations

import torch
from torch import nn


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (3, 224, 224)) -> int:
    """Multiply-adds for one image of shape `input_size` (C, H, W).

    Runs one forward pass in eval mode, so BN running statistics are left
    untouched; the model's train/eval modes are restored afterwards. A model
    on the meta device is counted without any arithmetic being done.
    """
    macs = 0

    # Batch size is 1, so every output element is one dot product of
    # (in_channels / groups) * kh * kw, or in_features, multiply-adds.
    def conv_hook(module: nn.Conv2d, _: object, output: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = module.kernel_size
        macs += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _: object, output: torch.Tensor) -> None:
        nonlocal macs
        macs += output.numel() * module.in_features

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    modes = {m: m.training for m in model.modules()}
    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return int(macs)
