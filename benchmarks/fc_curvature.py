"""Why deep CIFAR ResNets spike at lr 0.1: the FC layer's curvature at initialisation, per depth and BN-scale start.

At step 0 the residual stream of a ResNet sums the outputs of all its branches, each BN-normalised, so the pooled
features that the FC layer reads grow with depth. The cross-entropy's Hessian with respect to the FC weights and
bias is ``E[(diag(p) - p p^T) kron (x x^T)]`` (x: the pooled features with a 1 appended, p: the softmax), exactly,
because the logits are linear in them. SGD with momentum ``beta`` is stable on a quadratic only while
``lr * lambda_max < 2 (1 + beta)`` (3.8 at the paper's 0.9); above it, the FC layer's first steps overshoot, the
loss spikes, and the net sits near chance until the features shrink. This prints ``lr * lambda_max`` for the paper's
lr (0.1) and its warm-up lr (0.01), for each model and each ``model.bn_weight_init``, on the class-stratified
measurement batch (500 test images, preprocessed as the evaluation sees them)::

    python benchmarks/fc_curvature.py --config configs/cifar10/cifar_resnet56.toml \\
        --models cifar_resnet20,cifar_resnet56,cifar_resnet110,cifar_plain56
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/fc_curvature.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config
from pipeline.data import measurement_batch
from pipeline.models import build_model
from pipeline.models.spec import BN_WEIGHT_INITS

MOMENTUM_BOUND = 2 * (1 + 0.9)  # lr * lambda above this diverges on a quadratic (heavy ball, beta 0.9)


def pooled_features(
    model: torch.nn.Module, images: torch.Tensor, *, chunk: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the FC layer reads (the pooled features) and what it returns (the logits), in training mode: BN on
    each chunk's batch statistics, as in the first training steps."""
    feats: list[torch.Tensor] = []
    hook = model.avgpool.register_forward_hook(lambda _m, _i, out: feats.append(out.flatten(1)))
    model.train()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x) for x in images.split(chunk)])
    finally:
        hook.remove()
    return torch.cat(feats), logits


def fc_hessian_top(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, chunk: int = 100
) -> tuple[float, float]:
    """The largest eigenvalue of the mean cross-entropy's Hessian in the FC layer's weights and bias, and the
    loss itself (2.30 at chance: a deep net whose logits are already large starts above it, on a saturated
    softmax whose curvature is small but whose gradient is not)."""
    feats, logits = pooled_features(model, images, chunk=chunk)
    x = feats.double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    p = logits.double().softmax(1)
    k, d = p.shape[1], x.shape[1]
    hessian = torch.zeros(k * d, k * d, dtype=torch.float64)
    for xi, pi in zip(x, p, strict=True):
        hessian += torch.kron(torch.diag(pi) - torch.outer(pi, pi), torch.outer(xi, xi))
    loss = torch.nn.functional.cross_entropy(logits.double(), labels)
    return float(torch.linalg.eigvalsh(hessian / len(x))[-1]), float(loss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a CIFAR config: its data section gives the images")
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--inits", default=",".join(BN_WEIGHT_INITS), help="comma-separated model.bn_weight_init values")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    images, labels = measurement_batch(cfg.data, device=torch.device("cpu"), num_classes=cfg.model.num_classes)
    print(f"{'model':<18} {'bn_weight_init':<17} {'loss at init':>12} {'lr 0.1 x lambda':>15} {'lr 0.01 x lambda':>16}")
    for name in args.models.split(","):
        for init in args.inits.split(","):
            torch.manual_seed(args.seed)
            model = build_model(name, num_classes=cfg.model.num_classes, bn_weight_init=init)
            top, loss = fc_hessian_top(model, images, labels)
            marks = ["!" if lr * top > MOMENTUM_BOUND else " " for lr in (0.1, 0.01)]
            print(
                f"{name:<18} {init:<17} {loss:>12.2f} {0.1 * top:>14.1f}{marks[0]} {0.01 * top:>15.2f}{marks[1]}",
                flush=True,
            )
    print(f"! above {MOMENTUM_BOUND:.1f} = 2 (1 + momentum): the FC layer's first SGD steps overshoot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
