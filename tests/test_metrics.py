"""Top-k error counting (single process; the cross-rank sum is exercised by the 2-rank runs) and the efficiency
numbers a logging step adds."""

from __future__ import annotations

import torch

from pipeline.runtime.metrics import MetricSums, bf16_peak_tflops, efficiency, topk_correct


def test_topk_counts_hits():
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1])
    assert topk_correct(logits, labels, ks=(1, 2)).tolist() == [1.0, 3.0]


def test_metric_sums_report_percent_errors():
    m = MetricSums(torch.device("cpu"))
    logits = torch.eye(4)
    m.update(torch.tensor(0.5), logits, torch.tensor([0, 1, 2, 0]))
    out = m.reduce()
    assert out["count"] == 4 and out["top1_error"] == 25.0 and out["top5_error"] == 0.0
    assert abs(out["loss"] - 0.5) < 1e-9


def test_mfu_is_measured_against_the_device_names_bf16_peak_and_left_out_on_the_cpu() -> None:
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and bf16_peak_tflops("NVIDIA A10") == 125.0
    assert bf16_peak_tflops("NVIDIA L40S") == 362.0 and bf16_peak_tflops("NVIDIA L4") == 121.0
    assert bf16_peak_tflops("Tesla V100-SXM2-32GB") is None  # no bf16 tensor cores: no MFU
    cpu = efficiency(step_time_s=0.5, images_per_s=64.0, world_size=2, flops_per_image=1e12, device=torch.device("cpu"))
    assert cpu == {"step_time_s": 0.5, "tflops_per_device": 32.0}
