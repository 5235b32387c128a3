"""Synthetic batches for benchmarks: the model's input pipeline with the data cost removed.

One batch of random normalised images and labels is generated on the device once and yielded
``synthetic_batches`` times per epoch, so a benchmark measures the model and the collectives, not
decoding or host-to-device copies.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.errors import DataError
from pipeline.data.source import EpochSource, SourceOptions, derive_seed


class SyntheticSource(EpochSource):
    """Same interface and epoch/resume rules as a training :class:`~pipeline.data.loader.DaliSource`."""

    state_kind = "synthetic"
    identity_keys = ()  # random tensors: any position can be restored anywhere

    def __init__(self, options: SourceOptions, *, image_size: int, num_batches: int) -> None:
        if num_batches < 1:
            raise DataError(f"data.synthetic_batches = {num_batches}: must be >= 1")
        b = options.batch_size
        super().__init__(options, num_samples=num_batches * b * options.world_size, num_batches=num_batches)
        # Generated on the CPU and copied: CPU and CUDA generators give different streams for
        # the same seed, and the same seed should mean the same data on any machine.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self.split))
        images = torch.randn((b, 3, image_size, image_size), generator=gen, dtype=torch.float32)
        labels = torch.randint(0, self.num_classes, (b,), generator=gen, dtype=torch.int64)
        self._images = images.to(self.device)
        self._labels = labels.to(self.device)

    def _restarts_each_pass(self) -> bool:
        return False  # the val split too follows the training rules, as the docstring promises

    def _make_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._images, self._labels

    def state_dict(self) -> dict[str, Any]:
        return self._position_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self._seek(int(state["epoch"]), int(state["batch"]))
