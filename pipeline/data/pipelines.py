"""DALI graphs for training and evaluation, as plain ``@pipeline_def`` functions.

Both read, in order, an explicit file/label list that the loader (:mod:`pipeline.data.loader`)
built for one rank and one epoch: its shard, already shuffled for training and padded to a whole
number of batches. The loader owns sharding, shuffling, batching policy and epoch accounting; the
graphs decode on the CPU (``decoder="cpu"``) or with nvJPEG (``decoder="mixed"``) and emit NCHW
float32 images normalised with mean/std given on the 0-255 scale, plus int32 labels of shape (1,)
per sample.

Augmentation (training, :class:`TrainAugment`):

* ``style="cifar"``: 4-pixel zero padding, a random 32x32 crop, a horizontal flip (section 4.2).
* ``style="imagenet"``, ``augment="paper"`` (section 3.4): the shorter side resized to a length drawn
  uniformly from the integers in ``scale`` ([256, 480]), a random ``image_size`` crop, a horizontal
  flip, the mean subtracted (per channel, or the per-pixel ``mean_image``), and AlexNet's PCA
  colour augmentation (``lighting`` = its std, 0.1).
* ``style="imagenet"``, ``augment="rrc"``: random-resized crop (8%-100% of the area, aspect 3/4-4/3),
  the modern recipe; ``lighting`` applies to it too when > 0.

Evaluation (``eval_mode``): ``"center"`` (shorter side to ``val_resize``, centre crop), ``"10crop"``
(the 4 corner crops and the centre crop of that image, each also flipped: 10 views per image, stacked
as (10, 3, H, W)) and ``"multiscale"`` (the whole image with its shorter side at each of ``scales``,
one output per scale, for a fully-convolutional network).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def

from pipeline.data.errors import DataError
from pipeline.data.shard_format import EXTENSIONS
from pipeline.data.source import CIFAR_PAD, PAPER_SCALES

READER_NAME = "Reader"  # for reader_meta(); the loader checks its epoch arithmetic against DALI's
# How the readers open the user's local files: read(), not DALI's default mmap. A mapped file that shrinks or fails to
# read (a dataset rewritten under a running job, a network filesystem's I/O error) is a SIGBUS that kills the rank
# with no file named; read() makes it a DALI error that names the file. DALI's docs give mapping "a small benefit"
# on local disks and none on most network filesystems; read() was faster on small JPEGs and level on ImageNet-sized
# ones (benchmarks/RESULTS.md, "Reading local files"). s3:// paths are never mapped.
READER_IO: dict[str, Any] = {"dont_use_mmap": True}
# Samples in DALI's shuffling buffer for sharded training (its readers' default): it holds encoded images.
SHUFFLE_BUFFER = 1024

# AlexNet's PCA colour augmentation on ImageNet (Krizhevsky et al. 2012; the values of
# fb.resnet.torch, computed on RGB in [0, 1]): an RGB offset eigvec @ (alpha * eigval), alpha ~ N(0, sigma).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

# The 10-crop views in output order: (crop_pos_x, crop_pos_y, mirrored).
TEN_CROP_VIEWS = tuple(
    (x, y, m) for x, y in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)) for m in (0, 1)
)

# nvJPEG scratch sizes that fit ImageNet's largest images, from NVIDIA's ConvNets example: without
# them the decoder reallocates (and synchronises) whenever a bigger image shows up.
_IMAGENET_DEVICE_PADDING = 211025920
_IMAGENET_HOST_PADDING = 140544512


@dataclass(frozen=True, kw_only=True)
class TrainAugment:
    """The training augmentation of the module docstring; the loader hands it to the graph unread."""

    flip: bool = True
    augment: Literal["paper", "rrc"] = "paper"
    scale: tuple[int, int] = (256, 480)  # augment = "paper": [min, max] of the random shorter side
    lighting: float = 0.0  # std of the PCA colour augmentation; 0 disables it


def decoder_device_id(device: torch.device) -> int:
    """The ``device_id`` of a pipeline that decodes with ``decoder="mixed"``: the index of the CUDA ``device``."""
    if device.type != "cuda":
        raise DataError(f"GPU decoding needs a CUDA device, got device {device}; set --data.decoder=cpu")
    return device.index if device.index is not None else torch.cuda.current_device()


def _decode(jpegs, *, decoder: Literal["cpu", "mixed"], style: str):
    if decoder == "cpu":
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    extra = {}
    if style == "imagenet":
        extra = dict(device_memory_padding=_IMAGENET_DEVICE_PADDING, host_memory_padding=_IMAGENET_HOST_PADDING)
    # hw_decoder_load: the share of images sent to the A100/H100 hardware JPEG engine, the rest go
    # to CUDA decoding (ConvNets' value); ignored on GPUs without the engine.
    return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=0.65, **extra)


def _device(decoder: str) -> str:
    return "gpu" if decoder == "mixed" else "cpu"


def _labels(labels, decoder: str):
    # Labels go to the device with the images, so a GPU pipeline's outputs are all on one device.
    return labels.gpu() if decoder == "mixed" else labels


def _lighting_offset(sigma: float):
    """Per-sample RGB offset (0-255 scale) of AlexNet's PCA lighting, as a CPU tensor of shape (3,)."""
    alpha = fn.random.normal(shape=[3], stddev=sigma)
    scaled = alpha * types.Constant(np.asarray(PCA_EIGVAL, np.float32) * 255.0)
    # coord_transform multiplies the innermost dimension by M: here the one 3-vector by the eigenvectors.
    offset = fn.coord_transform(fn.reshape(scaled, shape=[1, 3]), M=np.asarray(PCA_EIGVEC, np.float32).ravel().tolist())
    return fn.reshape(offset, shape=[3])


def _normalise(
    images,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mean_image: np.ndarray | None,
    crop: tuple[int, int] | None = None,
    crop_pos: tuple = (0.5, 0.5),
    mirror=0,
    offset=None,
    pad: bool = False,
    device: str = "cpu",
):
    """Crop, mirror and normalise to CHW float: (x + offset - mean) / std.

    With ``mean_image`` the crop is taken first and the per-pixel mean subtracted from it (so the
    mean image lines up with the crop, whatever its position), then mirrored and scaled.
    """
    extra = {"out_of_bounds_policy": "pad"} if pad else {}
    if mean_image is not None:
        if crop is not None:
            images = fn.crop(images, crop=crop, crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1], **extra)
        images = fn.cast(images, dtype=types.FLOAT) - types.Constant(np.asarray(mean_image, np.float32), device=device)
        centre = types.Constant(np.zeros(3, np.float32))
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mirror=mirror,
            mean=centre - offset if offset is not None else [0.0, 0.0, 0.0],
            std=list(std),
        )
    centre = types.Constant(np.asarray(mean, np.float32))
    crop_args = dict(crop=crop, crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1], **extra) if crop is not None else {}
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mirror=mirror,
        mean=centre - offset if offset is not None else list(mean),
        std=list(std),
        **crop_args,
    )


@pipeline_def
def train_pipeline(
    *,
    files: Sequence[str],
    labels: Sequence[int],
    style: Literal["cifar", "imagenet"],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: Literal["cpu", "mixed"],
    augmentation: TrainAugment = TrainAugment(),
    mean_image: np.ndarray | None = None,
):
    """Augmented training batches of ``files`` (one rank's shard of one epoch, already shuffled)."""
    jpegs, label = fn.readers.file(
        files=list(files), labels=list(labels), random_shuffle=False, name=READER_NAME, **READER_IO
    )
    images = _train_images(
        jpegs,
        style=style,
        image_size=image_size,
        mean=mean,
        std=std,
        decoder=decoder,
        augmentation=augmentation,
        mean_image=mean_image,
    )
    return images, _labels(label, decoder)


def _train_images(
    jpegs,
    *,
    style: Literal["cifar", "imagenet"],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: Literal["cpu", "mixed"],
    augmentation: TrainAugment,
    mean_image: np.ndarray | None,
):
    """The training graph from encoded images to augmented, normalised CHW floats (whatever reads them)."""
    images = _decode(jpegs, decoder=decoder, style=style)
    mirror = fn.random.coin_flip(probability=0.5) if augmentation.flip else 0
    if style == "cifar":
        # Zero padding happens on the uint8 image (so pad pixels normalise to -mean/std, as with
        # torchvision's RandomCrop(padding=4) before Normalize); then a crop at one of the
        # (2 * pad + 1)^2 integer offsets, each equally likely. The centred oversize crop pads an
        # image_size image by exactly CIFAR_PAD on each side.
        # With the paper's per-pixel mean image it is subtracted first, so a pad pixel is the mean (0), as in the
        # paper's zero-padded, mean-subtracted images (InMemorySource does the same).
        if mean_image is not None:
            images = fn.cast(images, dtype=types.FLOAT) - types.Constant(
                np.asarray(mean_image, np.float32), device=_device(decoder)
            )
            mean = (0.0, 0.0, 0.0)
        padded = image_size + 2 * CIFAR_PAD
        images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)
        offsets = [i / (2 * CIFAR_PAD) for i in range(2 * CIFAR_PAD + 1)]
        pos = (fn.random.uniform(values=offsets), fn.random.uniform(values=offsets))
        return _normalise(
            images, mean=mean, std=std, mean_image=None, crop=(image_size, image_size), crop_pos=pos, mirror=mirror
        )
    if augmentation.augment == "paper":
        # An integer length, each equally likely (a rounded continuous draw would halve the end points).
        low, high = augmentation.scale
        shorter = fn.random.uniform(values=[float(v) for v in range(int(low), int(high) + 1)])
        images = fn.resize(images, resize_shorter=shorter)
        pos = (fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0)))
    else:
        images = fn.random_resized_crop(
            images, size=(image_size, image_size), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
        )
        pos = (0.5, 0.5)
    offset = _lighting_offset(augmentation.lighting) if augmentation.lighting > 0 else None
    return _normalise(
        images,
        mean=mean,
        std=std,
        mean_image=mean_image,
        crop=(image_size, image_size),
        crop_pos=pos,
        mirror=mirror,
        offset=offset,
        device=_device(decoder),
    )


@pipeline_def
def val_pipeline(
    *,
    files: Sequence[str],
    labels: Sequence[int],
    style: Literal["cifar", "imagenet"],
    image_size: int,
    val_resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: Literal["cpu", "mixed"],
    eval_mode: Literal["center", "10crop", "multiscale"] = "center",
    scales: Sequence[int] = PAPER_SCALES,
    mean_image: np.ndarray | None = None,
):
    """Deterministic evaluation batches of ``files`` (one rank's shard), in order; every pass is the same.

    Outputs: ``(images, labels)`` for ``center`` and ``10crop`` (images of shape (10, 3, H, W) per
    sample), and one image output per scale followed by the labels for ``multiscale`` (sizes differ
    between images).
    """
    jpegs, label = fn.readers.file(
        files=list(files), labels=list(labels), random_shuffle=False, name=READER_NAME, **READER_IO
    )
    outputs = _val_images(
        jpegs,
        style=style,
        image_size=image_size,
        val_resize=val_resize,
        mean=mean,
        std=std,
        decoder=decoder,
        eval_mode=eval_mode,
        scales=scales,
        mean_image=mean_image,
    )
    return (*outputs, _labels(label, decoder))


def _val_images(
    jpegs,
    *,
    style: Literal["cifar", "imagenet"],
    image_size: int,
    val_resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: Literal["cpu", "mixed"],
    eval_mode: Literal["center", "10crop", "multiscale"],
    scales: Sequence[int],
    mean_image: np.ndarray | None,
) -> tuple:
    """The evaluation graph from encoded images to its image outputs (one, or one per scale)."""
    images = _decode(jpegs, decoder=decoder, style=style)
    crop = (image_size, image_size)
    if eval_mode == "multiscale":
        # Whole images: a per-pixel mean has no fixed geometry here, so its per-channel average is used.
        channel_mean = list(mean) if mean_image is None else [float(v) for v in mean_image.mean(axis=(0, 1))]
        return tuple(
            _normalise(fn.resize(images, resize_shorter=float(s)), mean=channel_mean, std=std, mean_image=None)
            for s in scales
        )
    if style == "imagenet":
        images = fn.resize(images, resize_shorter=float(val_resize))
    if eval_mode == "10crop":
        views = [
            _normalise(
                images,
                mean=mean,
                std=std,
                mean_image=mean_image,
                crop=crop,
                crop_pos=(x, y),
                mirror=m,
                pad=True,
                device=_device(decoder),
            )
            for x, y, m in TEN_CROP_VIEWS
        ]
        return (fn.stack(*views),)
    # For CIFAR-style images (already image_size) the centre crop is a no-op; it only keeps a
    # stray larger image from breaking the batch, and pads a smaller one instead of failing.
    return (
        _normalise(images, mean=mean, std=std, mean_image=mean_image, crop=crop, pad=True, device=_device(decoder)),
    )


@pipeline_def
def shard_pipeline(
    *,
    paths: Sequence[str],
    index_paths: Sequence[str],
    train: bool,
    graph: dict[str, Any],
    shuffle: bool,
    map_files: bool,
    sample_bytes: int,
    shuffle_buffer: int = SHUFFLE_BUFFER,
):
    """Batches of WebDataset shards (:mod:`pipeline.data.shard_format`) read by DALI's ``readers.webdataset``.

    ``paths[k]`` is read through ``index_paths[k]``, which may list only some of its samples: that is how the
    loader gives a rank part of a shard. ``shuffle`` shuffles the stream with DALI's own buffer of ``shuffle_buffer``
    samples (seeded by the pipeline's seed; DALI 2.4 keeps it inside the reader's epoch). Training (``train=True``)
    augments as :func:`train_pipeline` (``graph`` holds its keywords but the lists); evaluation reads in order and takes
    :func:`val_pipeline`'s keywords. ``map_files`` maps the tars (DALI's default) instead of reading them
    (:data:`READER_IO`): a node-local cache needs it, since it evicts a shard once DALI has opened it, and DALI
    reopens a file it reads with read() by name, but keeps reading an unlinked one it mapped. ``sample_bytes`` (the
    split's mean) sizes the buffer DALI allocates for each sample it holds: its default, 1 MB, made filling the
    shuffle buffer (at every pipeline's start and, wasted, at its end) cost 10-20 ms of allocations. The last
    output is each sample's ``.cls`` bytes (ASCII digits) on the CPU, padded with zero bytes to the batch's longest
    (one array for the whole batch): the loader turns them into labels.
    """
    jpegs, cls = fn.readers.webdataset(
        paths=list(paths),
        index_paths=list(index_paths),
        ext=list(EXTENSIONS),
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=shuffle_buffer,
        # The last batch is filled with the last sample again (dropped by the loader) rather than from the next
        # reader epoch, which would refill the whole shuffle buffer at the epoch boundary.
        pad_last_batch=True,
        name=READER_NAME,
        tensor_init_bytes=sample_bytes,
        **({} if map_files else READER_IO),
    )
    outputs = (_train_images(jpegs, **graph),) if train else _val_images(jpegs, **graph)
    return (*outputs, fn.pad(cls, fill_value=0))
