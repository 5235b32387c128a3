"""CIFAR-sized datasets held in device memory: decoded once with DALI, augmented per batch with tensor ops.

The CIFAR networks are so small that per-image decoding and host-to-device copies would cost more than
the step itself. This source decodes a split once (``fn.decoders.image``, on the GPU when the decoder
is ``mixed``) into one uint8 tensor on the training device, and then every batch is a few kernels:
gather the images, pad-4 + random 32x32 crop + horizontal flip as one indexed gather from a zero-padded
copy, and normalisation. Nothing in a batch waits on the host.

Epoch and sharding rules are those of :class:`~pipeline.data.loader.DaliSource`:

* Training: each epoch is one permutation of the whole split, drawn from ``(seed, epoch)`` and so the
  same on every rank; rank ``r`` takes its contiguous part (shard sizes as DALI cuts them) and yields
  ``(num_samples // world_size) // batch_size`` batches, the same count on every rank. The crop offsets
  and flips of an epoch are drawn from ``(seed, rank, epoch)`` with a CPU ``torch.Generator``, so a
  resume at any (epoch, batch) gives bit-identical batches, on any device.
* Evaluation: rank ``r`` yields its shard, in file order, each image once; the last batch may be
  partial, and ranks may yield different numbers of batches (reduce sums after the loop).

Images come out NCHW float32, normalised, and stored channels-last (the gather produces that layout
for free, and it is the layout the GPU fast path runs in); labels are int64 on the same device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
import torch.nn.functional as F
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.data.dali_errors import explain_pipeline_error
from pipeline.data.errors import DataError
from pipeline.data.folder import SplitIndex
from pipeline.data.pipelines import READER_IO, decoder_device_id
from pipeline.data.source import CIFAR_PAD, EpochSource, SourceOptions, shard_range

_DECODE_BATCH = 1000


def _generator(*key: int) -> torch.Generator:
    seed = np.random.SeedSequence([k & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))


def decode_split(
    index: SplitIndex,
    *,
    image_size: int,
    device: torch.device,
    decoder: Literal["cpu", "mixed"],
    num_threads: int,
    root: str = "",
) -> torch.Tensor:
    """Every image of ``index`` as one uint8 NHWC tensor on ``device``, in index order.

    Images are centre-cropped (or zero-padded) to ``image_size``, which leaves CIFAR's 32x32 untouched. An
    image DALI cannot read or decode raises :class:`DataError` naming the file, as in :class:`DaliSource`
    (``root``, the dataset root, defaults to the split folder and only appears in that message)."""
    n = len(index)
    batch = min(_DECODE_BATCH, n)
    mixed = decoder == "mixed"

    @pipeline_def(
        batch_size=batch,
        num_threads=max(1, num_threads),
        prefetch_queue_depth=2,
        device_id=decoder_device_id(device) if mixed else None,
    )
    def decode():
        jpegs, _ = fn.readers.file(
            files=list(index.files), random_shuffle=False, pad_last_batch=True, name="Reader", **READER_IO
        )
        images = fn.decoders.image(jpegs, device="mixed" if mixed else "cpu", output_type=types.RGB)
        return fn.crop(images, crop=(image_size, image_size), out_of_bounds_policy="pad", fill_values=0)

    pipe = decode()
    try:
        pipe.build()
    except RuntimeError as e:
        raise explain_pipeline_error(e, files=index.files, root=root or index.path) from e
    out = torch.empty((n, image_size, image_size, 3), dtype=torch.uint8, device=device)
    for start in range(0, n, batch):
        try:
            (images,) = pipe.run()
        except RuntimeError as e:
            raise explain_pipeline_error(e, files=index.files, root=root or index.path) from e
        images = images.as_tensor()
        take = min(batch, n - start)  # the reader repeats the last image to fill the final batch
        if mixed:
            stream = torch.cuda.current_stream(device)
            full = torch.empty(images.shape(), dtype=torch.uint8, device=device)
            feed_ndarray(images, full, cuda_stream=stream)
            out[start : start + take] = full[:take]
            # Once per decode batch, at start-up: DALI may reuse this output's memory on its next run().
            stream.synchronize()
        else:
            out[start : start + take] = torch.from_numpy(np.array(images)[:take]).to(device)
    del pipe
    return out


class InMemorySource(EpochSource):
    """One split of an ImageFolder dataset in device memory, for one rank; see the module docstring."""

    state_kind = "memory"
    identity_keys = (*EpochSource.identity_keys, "seed")  # the crop/flip plan is drawn from the seed

    def __init__(
        self,
        index: SplitIndex,
        options: SourceOptions,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
        decoder: Literal["cpu", "mixed"] = "cpu",
        num_threads: int = 2,
        images: torch.Tensor | None = None,
        root: str = "",
        mean_image: np.ndarray | None = None,
    ) -> None:
        """``images`` (uint8 NHWC, index order) skips decoding: tests and callers that hold the split already.
        ``mean_image`` (H x W x 3, 0-255): the paper's per-pixel mean, subtracted before the padding, so a pad pixel
        is the mean (0) as in the paper's zero-padded mean-subtracted images; ``mean`` is then not used."""
        n = len(index)
        super().__init__(options, num_samples=n, num_batches=options.epoch_length(n, path=index.path))
        self.index = index
        self.image_size = image_size
        self.flip = flip
        self._shard_start, shard_stop = shard_range(n, self.world_size, self.rank)
        self._shard_len = shard_stop - self._shard_start
        if images is None:
            images = decode_split(
                index, image_size=image_size, device=self.device, decoder=decoder, num_threads=num_threads, root=root
            )
        if tuple(images.shape) != (n, image_size, image_size, 3) or images.dtype != torch.uint8:
            raise DataError(
                f"decoded {index.path} to {tuple(images.shape)} {images.dtype}, expected "
                f"({n}, {image_size}, {image_size}, 3) uint8"
            )
        images = images.to(self.device)
        if self.split == "train":
            # Zero padding on the uint8 image, so pad pixels normalise to -mean/std, as with torchvision's
            # RandomCrop(padding=4) before Normalize and as in the DALI pipeline.
            images = F.pad(images.permute(0, 3, 1, 2), (CIFAR_PAD,) * 4).permute(0, 2, 3, 1).contiguous()
        self._images = images
        self._labels = torch.tensor(index.labels, dtype=torch.int64, device=self.device)
        self._scale = (1.0 / torch.tensor(list(std), dtype=torch.float32)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-torch.tensor(list(mean), dtype=torch.float32)).view(1, 3, 1, 1).to(self.device) * self._scale
        self._mean_image: torch.Tensor | None = None
        if mean_image is not None:
            self._shift = torch.zeros_like(self._shift)
            pad = CIFAR_PAD if self.split == "train" else 0  # lined up with the padded training images
            m = torch.from_numpy(np.asarray(mean_image, np.float32)).permute(2, 0, 1)
            self._mean_image = F.pad(m, (pad,) * 4).permute(1, 2, 0).contiguous().to(self.device)
        self._ar = torch.arange(image_size, device=self.device)
        self._plan_epoch = -1
        self._plan: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------
    def _make_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._train_batch(batch) if self.split == "train" else self._val_batch(batch)

    def plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """This rank's sample indices, crop offsets and flips for a whole training epoch (CPU tensors)."""
        count = self._len * self.batch_size
        perm = torch.randperm(self.num_samples, generator=_generator(self.seed, epoch, 0))
        start = self._shard_start
        g = _generator(self.seed, epoch, 1, self.rank)
        span = 2 * CIFAR_PAD + 1
        return {
            "index": perm[start : start + count],
            "dy": torch.randint(0, span, (count,), generator=g),
            "dx": torch.randint(0, span, (count,), generator=g),
            "flip": torch.randint(0, 2, (count,), generator=g).bool()
            if self.flip
            else torch.zeros(count, dtype=torch.bool),
        }

    def _device_plan(self) -> dict[str, torch.Tensor]:
        if self._plan_epoch != self._epoch:
            p = self.plan(self._epoch)
            s = self.image_size
            rev = s - 1 - torch.arange(s)
            rows = p["dy"][:, None] + torch.arange(s)
            cols = p["dx"][:, None] + torch.where(p["flip"][:, None], rev, torch.arange(s))
            # Once per epoch, so the per-batch work has no host-to-device copy in it.
            self._plan = {
                "index": p["index"].to(self.device),
                "rows": rows.to(self.device),
                "cols": cols.to(self.device),
            }
            self._plan_epoch = self._epoch
        return self._plan

    def _train_batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._device_plan()
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        idx, rows, cols = plan["index"][sl], plan["rows"][sl], plan["cols"][sl]
        # Pad + crop + flip as one gather: output pixel (i, j) of sample k is padded[idx_k, rows_ki, cols_kj].
        x = self._images[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self._mean_image is not None:  # the mean under each output pixel, through the same crop and flip
            x = x.float() - self._mean_image[rows[:, :, None], cols[:, None, :]]
        return self._normalise(x), self._labels[idx]

    def _val_batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self._shard_start + b * self.batch_size
        hi = min(self._shard_start + self._shard_len, lo + self.batch_size)
        x = self._images[lo:hi]
        if self._mean_image is not None:
            x = x.float() - self._mean_image
        return self._normalise(x), self._labels[lo:hi]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, x.permute(0, 3, 1, 2).float(), self._scale)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._position_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self._seek(int(state["epoch"]), int(state["batch"]) if self.split == "train" else 0)
