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
