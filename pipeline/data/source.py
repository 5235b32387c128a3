"""The interface every data source implements (DALI folders, the digits set, synthetic data),
and the pieces of its saved state that all sources share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import DataError

STATE_FORMAT = 1  # bump when a source's state_dict layout changes


@runtime_checkable
class DataSource(Protocol):
    """One split of a dataset, as seen by one rank.

    Iterating yields the rest of the current epoch as ``(images, labels)``: images are float32
    NCHW and normalised, labels are int64 of shape (N,), both already on the requested device.
    """

    num_samples: int  # images in the split, over all ranks
    num_classes: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The exact data position of this rank (epoch, batch, reader and RNG state)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` on the same rank of a same-sized job."""
        ...


def derive_seed(seed: int, rank: int, split: str) -> int:
    """Independent, non-negative 31-bit seed per (seed, rank, split).

    A plain ``seed + rank`` would make (seed=1, rank=0) and (seed=0, rank=1) draw the same numbers,
    and the same seed on every rank would give all ranks identical augmentation draws.
    """
    salt = {"train": 0, "val": 1}.get(split, 2)
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, rank, salt]).generate_state(1, dtype=np.uint32)
    return int(state[0]) & 0x7FFFFFFF


def check_state(state: Any, *, kind: str, expect: dict[str, Any]) -> None:
    """Refuse a saved state that cannot reproduce this source's data exactly."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("kind") != kind:
        got = (state.get("kind"), state.get("format")) if isinstance(state, dict) else type(state).__name__
        raise DataError(f"data state {got} is not a {kind!r} state of format {STATE_FORMAT}: the checkpoint was "
                        f"written with a different data.source or code version; resume with the same data "
                        f"settings, or start the run without resuming")
    for key, want in expect.items():
        if state.get(key) != want:
            raise DataError(f"data state was saved with {key} = {state.get(key)!r} but this source has {want!r}; "
                            f"an exact resume needs the same {key} (same number of ranks, data.batch_size and "
                            f"dataset, with each rank loading the state it saved)")
