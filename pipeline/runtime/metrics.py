"""Classification metrics accumulated on the device and reduced across ranks only when read.

Keeping the sums as tensors avoids a host synchronisation (``.item()``) on every step.
"""

from __future__ import annotations

import torch

from pipeline.core.distributed import all_reduce_sum


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is within the top-k predictions, one entry per k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).to(torch.float64)


class MetricSums:
    """Running sums of loss, top-1/top-5 hits and sample count; ``reduce`` sums over all ranks.

    Training adds a batch's mean loss (``update``); evaluation adds averaged class probabilities, whose
    loss is their negative log-likelihood (``update_scores``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [loss_sum, top1_hits, top5_hits, count]
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._add(loss.detach().double() * labels.shape[0], logits.detach(), labels)

    @torch.no_grad()
    def update_scores(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of class probabilities (N, classes), e.g. averaged over crops or scales."""
        nll = -probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12).log().sum()
        self._add(nll.double(), probs, labels)

    def _add(self, loss_sum: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        hits = topk_correct(scores, labels)
        self.sums[:3] += torch.stack([loss_sum, hits[0], hits[1]])
        # The count is a Python int added in place: building a tensor from it would be a blocking
        # host-to-device copy, one host sync per step on a GPU.
        self.sums[3] += labels.shape[0]

    def reduce(self) -> dict[str, float]:
        """Global loss and top-1/top-5 error (percent) over every rank's samples; a collective call."""
        return self.reduce_with(torch.zeros(0, dtype=torch.float64, device=self.device))[0]

    def reduce_with(self, extra: torch.Tensor) -> tuple[dict[str, float], list[float]]:
        """``reduce`` plus the sum over ranks of ``extra`` (float64, this device), in the same collective."""
        sums = all_reduce_sum(torch.cat([self.sums, extra]))
        loss, top1, top5, n, *rest = sums.tolist()
        n_images = int(n)
        n = max(n, 1.0)
        out = {
            "loss": loss / n,
            "top1_error": 100.0 * (1 - top1 / n),
            "top5_error": 100.0 * (1 - top5 / n),
            "count": n_images,
        }
        return out, rest


# Dense bf16 tensor-core peak of one device in TFLOP/s (NVIDIA's datasheets, without sparsity), matched in this order
# against the lower-case CUDA device name: the more specific names first ("h100 pcie" before "h100"). A device that
# is not listed (or a CPU) gets no MFU; its TFLOP/s are still logged.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("b100", 1750.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a30", 165.0),
    ("a40", 150.0),
    ("a10", 125.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The listed bf16 peak of a CUDA device by its name (``torch.cuda.get_device_name``), or None."""
    name = device_name.lower()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


# What a logged row says about speed rather than training: it differs between two runs of the same steps, so a
# comparison of runs (exact resume, diagnostics on and off) leaves these out.
TIMING_KEYS = ("images_per_s", "data_wait_share", "step_time_s", "tflops_per_device", "mfu")


def is_timing(key: str) -> bool:
    return key in TIMING_KEYS or key.startswith("memory/")


def efficiency(
    *, step_time_s: float, images_per_s: float, world_size: int, flops_per_image: float, device: torch.device
) -> dict[str, float]:
    """What a logging step adds about speed: the mean optimizer step time, each device's training TFLOP/s
    (``flops_per_image``: forward and backward, 0 = not counted) and on a listed GPU its MFU against the bf16
    peak; on CUDA the allocator's peak memory since the last call (reset here). Host-side reads only: no sync."""
    out = {"step_time_s": step_time_s}
    if flops_per_image > 0:
        tflops = flops_per_image * images_per_s / world_size / 1e12
        out["tflops_per_device"] = tflops
        peak = bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if peak:
            out["mfu"] = tflops / peak
    if device.type == "cuda":
        out["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out
