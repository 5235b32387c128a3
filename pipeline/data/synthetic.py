"""Synthetic batches for benchmarks: the model's input pipeline with the data cost removed.

One batch of random normalised images and labels is generated on the device once and yielded
``synthetic_batches`` times per epoch, so a benchmark measures the model and the collectives, not
decoding or host-to-device copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .errors import DataError
from .source import STATE_FORMAT, check_state, derive_seed


class SyntheticSource:
    """Same interface and epoch/resume rules as a training :class:`~pipeline.data.loader.DaliSource`."""

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        num_batches: int,
        num_classes: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        split: str = "train",
    ) -> None:
        if num_batches < 1:
            raise DataError(f"data.synthetic_batches = {num_batches}: must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.num_classes = num_classes
        self.num_samples = num_batches * batch_size * world_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._len = num_batches
        self._epoch = 0
        self._batch = 0
        self._generation = 0
        device = torch.device(device)
        # Generated on the CPU and copied: CPU and CUDA generators give different streams for
        # the same seed, and the same seed should mean the same data on any machine.
        gen = torch.Generator().manual_seed(derive_seed(seed, rank, split))
        images = torch.randn((batch_size, 3, image_size, image_size), generator=gen, dtype=torch.float32)
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen, dtype=torch.int64)
        self._images = images.to(device)
        self._labels = labels.to(device)

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._batch >= self._len:
            self._epoch, self._batch = self._epoch + 1, 0
        while self._batch < self._len:
            self._batch += 1
            yield self._images, self._labels
            if generation != self._generation:
                return
        self._epoch, self._batch = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": "synthetic", "epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, kind="synthetic", expect={})
        self._generation += 1
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
