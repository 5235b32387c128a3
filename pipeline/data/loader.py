"""DALI pipelines wrapped as epoch-structured, resumable torch data sources.

Epoch accounting is done here, not by DALI's framework iterators, because the two splits need
different rules and both must be exact:

* Training: every rank yields ``(num_samples // world_size) // batch_size`` batches per epoch,
  whatever the size of its shard, so all ranks issue the same number of collectives. The
  reader's epoch is ``ceil(ceil(N / W) / B)`` batches on every rank (``pad_last_batch``); the 0 or
  1 trailing batch beyond the yielded count (which holds the remainder and the padding) is
  decoded and dropped, which keeps all readers on the same epoch boundary.
* Evaluation: every image is yielded exactly once over all ranks. A rank yields its shard's
  ``n_r`` real images, the last batch partially, and drops the padding DALI adds to even out
  shards. Ranks may therefore yield different numbers of batches (and samples): reduce metric
  *sums* across ranks after the loop, and never put a collective inside the evaluation loop.

``state_dict`` records (epoch, batch) plus DALI's own checkpoint (reader position, shuffle buffer
RNG, augmentation RNGs); a rebuilt source that loads it continues with bitwise-identical batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from .errors import DataError
from .folder import SplitIndex
from .pipelines import READER_NAME, train_pipeline, val_pipeline
from .source import STATE_FORMAT, check_state, derive_seed


def shard_sizes(num_samples: int, world_size: int) -> list[int]:
    """Real samples in each shard, split as DALI does (shard r starts at floor(N * r / W))."""
    starts = [num_samples * r // world_size for r in range(world_size + 1)]
    return [starts[r + 1] - starts[r] for r in range(world_size)]


class DaliSource:
    """One split of an ImageFolder dataset for one rank; see the module docstring for epoch rules.

    Iterating yields the rest of the current epoch. For training a new ``iter()`` continues where
    the last one stopped (that is what resuming needs); an epoch that was fully consumed moves on
    to the next. For evaluation each ``iter()`` is one complete pass, even if the previous pass
    was abandoned half-way.
    """

    def __init__(
        self,
        index: SplitIndex,
        *,
        split: Literal["train", "val"],
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        num_classes: int,
        batch_size: int,
        style: Literal["cifar", "imagenet"],
        image_size: int,
        val_resize: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_threads: int,
        prefetch: int,
        decoder: Literal["cpu", "mixed"],
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.index = index
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.seed = seed
        self.num_classes = num_classes
        self.num_samples = len(index)
        self.batch_size = batch_size
        self.decoder = decoder
        self._pipe_kwargs: dict[str, Any] = dict(
            files=index.files, labels=index.labels, shard_id=rank, num_shards=world_size, style=style,
            image_size=image_size, mean=list(mean), std=list(std), decoder=decoder,
            batch_size=batch_size, num_threads=num_threads, prefetch_queue_depth=prefetch,
            seed=derive_seed(seed, rank, split),
            device_id=_device_id(self.device) if decoder == "mixed" else None,
        )
        if split == "val":
            self._pipe_kwargs["val_resize"] = val_resize

        n_max = math.ceil(self.num_samples / world_size)
        self._reader_batches = math.ceil(n_max / batch_size)  # DALI's epoch length, same on all ranks
        if split == "train":
            self._len = (self.num_samples // world_size) // batch_size
            if self._len == 0:
                raise DataError(f"{index.path} has {self.num_samples} images: fewer than world_size * batch_size = "
                                f"{world_size} * {batch_size}, so an epoch would have no full batch; "
                                f"lower --data.batch_size or use fewer ranks")
            self._shard_len = self._len * batch_size
        else:
            if self.num_samples < world_size:
                raise DataError(f"{index.path} has {self.num_samples} images, fewer than the {world_size} ranks that "
                                f"would each read a shard of it; add images or use fewer ranks")
            self._shard_len = shard_sizes(self.num_samples, world_size)[rank]
            self._len = math.ceil(self._shard_len / batch_size)

        self._pipe = None
        self._pending_checkpoint: bytes | None = None
        self._epoch = 0
        self._batch = 0  # reader batches consumed in the current epoch (yielded + dropped)
        self._generation = 0  # bumped per iter(); an older, abandoned generator then stops

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._pipeline()
        if self.split == "train" and self._batch >= self._len:
            self._finish_epoch(pipe)
        elif self.split == "val" and self._batch > 0:
            self._finish_epoch(pipe)
        while self._batch < self._len:
            valid = min(self.batch_size, self._shard_len - self._batch * self.batch_size)
            batch = self._next_batch(pipe, valid)
            self._batch += 1
            yield batch
            if generation != self._generation:
                return
        self._finish_epoch(pipe)

    def _finish_epoch(self, pipe) -> None:
        while self._batch < self._reader_batches:
            pipe.run()
            self._batch += 1
        self._epoch += 1
        self._batch = 0

    # ------------------------------------------------------------------------------------------
    def _pipeline(self):
        if self._pipe is None:
            build = train_pipeline if self.split == "train" else val_pipeline
            pipe = build(**self._pipe_kwargs, enable_checkpointing=self.split == "train",
                         checkpoint=self._pending_checkpoint)
            pipe.build()
            meta = pipe.reader_meta(READER_NAME)
            expected = math.ceil(self.num_samples / self.world_size) * self.world_size
            if meta["epoch_size"] != self.num_samples or meta["epoch_size_padded"] != expected:
                raise RuntimeError(f"DALI reader epoch {meta} does not match the loader's arithmetic "
                                   f"(N={self.num_samples}, padded={expected}); the DALI version changed behaviour")
            self._pipe = pipe
            self._pending_checkpoint = None
        return self._pipe

    def _next_batch(self, pipe, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoder == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            # Outputs bound to torch's stream: no host sync, and DALI may only reuse their memory
            # once that stream has passed the copies queued below.
            stream = torch.cuda.current_stream(self.device)
            images, labels = (o.as_tensor() for o in pipe.run(stream))
            x = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
            y = torch.empty(labels.shape(), dtype=torch.int32, device=self.device)
            feed_ndarray(images, x, cuda_stream=stream)
            feed_ndarray(labels, y, cuda_stream=stream)
        else:
            # Copied out of DALI's buffers via numpy; pinned when headed for a GPU (decoder="cpu"
            # on a GPU machine) so the upload is asynchronous.
            images, labels = (np.array(o.as_tensor()) for o in pipe.run())
            x, y = torch.from_numpy(images), torch.from_numpy(labels)
            pin = self.device.type == "cuda"
            x = x.pin_memory().to(self.device, non_blocking=True) if pin else x
            y = y.to(self.device)
        y = y.view(-1).long()
        if valid < self.batch_size:
            x, y = x[:valid], y[:valid]
        return x, y

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.split == "train":
            pipeline = self._pipe.checkpoint() if self._pipe is not None else self._pending_checkpoint
        else:
            pipeline = None  # every evaluation pass is identical; only the counter matters
        return {
            "format": STATE_FORMAT,
            "kind": "dali",
            "split": self.split,
            "epoch": self._epoch,
            "batch": self._batch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "pipeline": pipeline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, kind="dali", expect={"split": self.split, "rank": self.rank,
                                                "world_size": self.world_size, "batch_size": self.batch_size,
                                                "num_samples": self.num_samples})
        pipeline = state.get("pipeline")
        if self.split == "train" and pipeline is None and (state["epoch"], state["batch"]) != (0, 0):
            raise DataError(f"data state at epoch {state['epoch']}, batch {state['batch']} has no DALI checkpoint, "
                            f"so the position cannot be restored exactly; resume from a checkpoint written by "
                            f"DaliSource.state_dict()")
        self._pipe = None  # rebuilt lazily from the checkpoint; a live generator is cut off below
        self._generation += 1
        self._pending_checkpoint = bytes(pipeline) if pipeline is not None else None
        self._epoch = int(state["epoch"])
        self._batch = int(state["batch"]) if self.split == "train" else 0


def _device_id(device: torch.device) -> int:
    if device.type != "cuda":
        raise DataError(f"GPU decoding needs a CUDA device, got device {device}; set --data.decoder=cpu")
    return device.index if device.index is not None else torch.cuda.current_device()
