"""DeepSpeed config assembly and optimizer groups (the engine itself runs in the 2-rank tests)."""

from __future__ import annotations

from pipeline.config import DistributedConfig, PrecisionConfig
from pipeline.models import build_model
from pipeline.runtime.engine import deepspeed_config, param_groups


def test_bf16_goes_through_torch_autocast_not_bf16_weights():
    cfg = deepspeed_config(
        precision=PrecisionConfig(dtype="bf16"),
        distributed=DistributedConfig(zero_stage=1),
        grad_clip=1.0,
        micro_batch=32,
        world_size=4,
    )
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in cfg and "fp16" not in cfg
    assert cfg["train_batch_size"] == 128 and cfg["zero_optimization"]["stage"] == 1
    assert cfg["zero_allow_untested_optimizer"] and cfg["gradient_clipping"] == 1.0


def test_fp32_has_no_autocast():
    cfg = deepspeed_config(
        precision=PrecisionConfig(),
        distributed=DistributedConfig(grad_accum=2),
        grad_clip=0.0,
        micro_batch=8,
        world_size=1,
    )
    # gradient_clipping must be given as 0: DeepSpeed's default (1.0) would clip every run.
    assert "torch_autocast" not in cfg and cfg["gradient_clipping"] == 0.0
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 2


def test_no_decay_groups_hold_bn_and_bias():
    model = build_model("cifar_resnet20")
    decay, no_decay = param_groups(model, weight_decay=1e-4, no_decay_bn_bias=True)
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
