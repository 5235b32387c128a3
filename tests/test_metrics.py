"""Top-k error counting (single process; the cross-rank sum is exercised by the 2-rank runs)."""

from __future__ import annotations

import torch

from pipeline.runtime.metrics import MetricSums, topk_correct


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
