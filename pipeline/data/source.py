"""The interface every data source implements (DALI folders, the digits set, synthetic data),
and what all sources share: their options, sharding and epoch bookkeeping, and the pieces of
their saved state."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.data.errors import DataError

STATE_FORMAT = 1  # bump when a source's state_dict layout changes
CIFAR_PAD = 4  # "4 pixels are padded on each side" (He et al. 2015, section 4.2)
PAPER_SCALES = (224, 256, 384, 480, 640)  # multi-scale testing: shorter sides of section 3.4


@runtime_checkable
class DataSource(Protocol):
    """One split of a dataset, as seen by one rank.

    Iterating yields the rest of the current epoch as ``(images, labels)``: images are float32
    NCHW and normalised, labels are int64 of shape (N,), both already on the requested device.
    A training source is the one owner of the data position (:attr:`position`): the trainer asks it
    which epoch and batch it is at rather than counting on its own.
    """

    num_samples: int  # images in the split, over all ranks
    num_classes: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        ...

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch)``: epochs completed and batches yielded of the current one (``batch < len()``)."""
        ...

    def start_epoch(self, epoch: int) -> None:
        """Go to the first batch of ``epoch`` (a resume whose saved position does not apply here)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The exact data position of this rank (epoch, batch, reader and RNG state)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` on the same rank of a same-sized job."""
        ...


def shard_range(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``rank``: ``[floor(N * r / W), floor(N * (r + 1) / W))``."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def shard_sizes(num_samples: int, world_size: int) -> list[int]:
    """Real samples in each shard (see :func:`shard_range`)."""
    return [stop - start for start, stop in (shard_range(num_samples, world_size, r) for r in range(world_size))]


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """What every source is built for: one split, one rank of the job, its device and batch size.

    Built once by :func:`~pipeline.data.build.build_source` and handed to whichever source it picks,
    so the rank check and the epoch arithmetic below hold for all of them alike.
    """

    split: Literal["train", "val"]
    rank: int
    world_size: int
    device: torch.device
    seed: int  # the run's base seed; a source derives its own streams from it (derive_seed)
    num_classes: int
    batch_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside world_size {self.world_size}")
        # A device given as a string ("cuda:1") must compare equal to the tensors' devices later.
        object.__setattr__(self, "device", torch.device(self.device))

    def epoch_length(self, num_samples: int, *, path: str) -> int:
        """Batches this rank yields per epoch of a split of ``num_samples`` images read from ``path``.

        Training: ``(num_samples // world_size) // batch_size``, the same on every rank, so all ranks
        issue the same number of collectives. Evaluation: this rank's whole shard, the last batch
        partial. Raises :class:`DataError` for a split too small to give every rank something.
        """
        n, w, b = num_samples, self.world_size, self.batch_size
        if self.split == "train":
            batches = (n // w) // b
            if batches == 0:
                raise DataError(
                    f"{path} has {n} images: fewer than world_size * batch_size = {w} * {b}, so an epoch "
                    f"would have no full batch; lower --data.batch_size or use fewer ranks"
                )
            return batches
        if n < w:
            raise DataError(
                f"{path} has {n} images, fewer than the {w} ranks that would each read a shard of it; "
                f"add images or use fewer ranks"
            )
        start, stop = shard_range(n, w, self.rank)
        return math.ceil((stop - start) / b)


class EpochSource:
    """Epoch bookkeeping for a :class:`DataSource`: ``len()``, ``position`` and iteration by generations.

    A training ``iter()`` continues where the last one stopped (that is what resuming needs) and an
    epoch that was fully consumed moves on to the next; an evaluation ``iter()`` is one whole pass.
    Subclasses yield batches through :meth:`_make_batch`, or replace :meth:`_iterate` entirely, and
    jump to another position only through :meth:`_seek` (which a subclass extends to drop its reader).
    """

    state_kind = ""  # the "kind" of this source's saved states; a state of another kind is refused
    # What a saved position holds only for: a state saved under other values of these cannot reproduce this
    # source's batches, so load_state_dict refuses it (naming the key).
    identity_keys: tuple[str, ...] = ("split", "rank", "world_size", "batch_size", "num_samples")

    def __init__(self, options: SourceOptions, *, num_samples: int, num_batches: int) -> None:
        # Plain attributes, read by the subclasses' hot paths and by callers that inspect a source.
        self.split, self.rank, self.world_size = options.split, options.rank, options.world_size
        self.device, self.seed = options.device, options.seed
        self.num_classes, self.batch_size = options.num_classes, options.batch_size
        self.num_samples = num_samples
        self._len = num_batches
        self._epoch = 0
        self._batch = 0  # batches consumed in the current epoch
        self._generation = 0  # bumped per iter() and per load_state_dict(); an older generator then stops

    def __len__(self) -> int:
        return self._len

    @property
    def position(self) -> tuple[int, int]:
        # An epoch whose last batch was yielded is complete, even before its generator has run on to the
        # end (DaliSource reads the dropped rest of its shard there): a save at that moment resumes in the
        # next epoch, and the trainer sees the epoch end right after the batch that ended it.
        if self._batch >= self._len:
            return self._epoch + 1, 0
        return self._epoch, self._batch

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.position[0]

    def start_epoch(self, epoch: int) -> None:
        self._seek(epoch, 0)

    def _seek(self, epoch: int, batch: int) -> None:
        self._generation += 1  # a live generator stops at its next step
        self._epoch, self._batch = epoch, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._generation += 1
        return self._iterate(self._generation)

    def _restarts_each_pass(self) -> bool:
        return self.split == "val"

    def _iterate(self, generation: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._restarts_each_pass():
            self._batch = 0
        elif self._batch >= self._len:
            self._epoch, self._batch = self._epoch + 1, 0
        while self._batch < self._len:
            batch = self._make_batch(self._batch)
            self._batch += 1
            yield batch
            if generation != self._generation:
                return
        self._epoch, self._batch = self._epoch + 1, 0

    def _make_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``batch`` of the current epoch."""
        raise NotImplementedError

    def _position_state(self) -> dict[str, Any]:
        """The part of ``state_dict`` every source shares: format, kind, position and identity."""
        identity = {key: getattr(self, key) for key in self.identity_keys}
        return {"format": STATE_FORMAT, "kind": self.state_kind, "epoch": self._epoch, "batch": self._batch, **identity}

    def _check_state(self, state: Any) -> None:
        check_state(state, kind=self.state_kind, expect={key: getattr(self, key) for key in self.identity_keys})


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
        raise DataError(
            f"data state {got} is not a {kind!r} state of format {STATE_FORMAT}: the checkpoint was "
            f"written with a different data.source or code version; resume with the same data "
            f"settings, or start the run without resuming"
        )
    for key, want in expect.items():
        if state.get(key) != want:
            raise DataError(
                f"data state was saved with {key} = {state.get(key)!r} but this source has {want!r}; "
                f"an exact resume needs the same {key} (same number of ranks, data.batch_size and "
                f"dataset, with each rank loading the state it saved)"
            )
