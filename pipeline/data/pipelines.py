"""DALI graphs for training and evaluation, as plain ``@pipeline_def`` functions.

Both read an explicit file/label list (see :mod:`pipeline.data.folder`) sharded by global rank,
decode on the CPU (``decoder="cpu"``) or with nvJPEG (``decoder="mixed"``), and emit NCHW float32
images normalised with mean/std given on the 0-255 scale, plus int32 labels of shape (1,) per
sample. The loader (:mod:`pipeline.data.loader`) owns batching policy and epoch accounting.

Every reader is created with ``pad_last_batch=True``: each shard then returns the same number of
batches per epoch (ceil(ceil(N / num_shards) / batch_size)), the padding being the shard's last
sample repeated at the end of the epoch. The loader relies on that to keep every rank's reader on
the same epoch boundary and to know which samples are padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

READER_NAME = "Reader"  # for reader_meta(); the loader checks its epoch arithmetic against DALI's
CIFAR_PAD = 4  # "4 pixels are padded on each side" (He et al. 2015, section 4.2)

# nvJPEG scratch sizes that fit ImageNet's largest images, from NVIDIA's ConvNets example: without
# them the decoder reallocates (and synchronises) whenever a bigger image shows up.
_IMAGENET_DEVICE_PADDING = 211025920
_IMAGENET_HOST_PADDING = 140544512


def _decode(jpegs, *, decoder: Literal["cpu", "mixed"], style: str):
    if decoder == "cpu":
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    extra = {}
    if style == "imagenet":
        extra = dict(device_memory_padding=_IMAGENET_DEVICE_PADDING, host_memory_padding=_IMAGENET_HOST_PADDING)
    # hw_decoder_load: the share of images sent to the A100/H100 hardware JPEG engine, the rest go
    # to CUDA decoding (ConvNets' value); ignored on GPUs without the engine.
    return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=0.65, **extra)


def _labels(labels, decoder: str):
    # Labels go to the device with the images, so a GPU pipeline's outputs are all on one device.
    return labels.gpu() if decoder == "mixed" else labels


@pipeline_def
def train_pipeline(
    *,
    files: Sequence[str],
    labels: Sequence[int],
    shard_id: int,
    num_shards: int,
    style: Literal["cifar", "imagenet"],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: Literal["cpu", "mixed"],
):
    """Shuffled, augmented training batches.

    ``random_shuffle=True`` makes DALI permute the file list once with a fixed seed (identical on
    every rank, so the shards stay disjoint) and shuffle each epoch through a buffer seeded from the
    pipeline seed. ``stick_to_shard=False`` moves every rank to the next shard after each epoch,
    so over ``num_shards`` epochs each rank sees all of the data.
    """
    jpegs, label = fn.readers.file(files=list(files), labels=list(labels), shard_id=shard_id,
                                   num_shards=num_shards, random_shuffle=True, pad_last_batch=True,
                                   stick_to_shard=False, name=READER_NAME)
    images = _decode(jpegs, decoder=decoder, style=style)
    if style == "cifar":
        # Zero padding happens on the uint8 image (so pad pixels normalise to -mean/std, as with
        # torchvision's RandomCrop(padding=4) before Normalize); then a crop at one of the
        # (2 * pad + 1)^2 integer offsets, each equally likely. The centred oversize crop pads an
        # image_size image by exactly CIFAR_PAD on each side.
        padded = image_size + 2 * CIFAR_PAD
        images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)
        offsets = [i / (2 * CIFAR_PAD) for i in range(2 * CIFAR_PAD + 1)]
        pos_x = fn.random.uniform(values=offsets)
        pos_y = fn.random.uniform(values=offsets)
    else:
        images = fn.random_resized_crop(images, size=(image_size, image_size), random_area=(0.08, 1.0),
                                        random_aspect_ratio=(3 / 4, 4 / 3))
        pos_x = pos_y = 0.5
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      crop=(image_size, image_size), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                      mean=list(mean), std=list(std), mirror=fn.random.coin_flip(probability=0.5))
    return images, _labels(label, decoder)


@pipeline_def
def val_pipeline(
    *,
    files: Sequence[str],
    labels: Sequence[int],
    shard_id: int,
    num_shards: int,
    style: Literal["cifar", "imagenet"],
    image_size: int,
    val_resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder: Literal["cpu", "mixed"],
):
    """Deterministic evaluation batches, in file order within each shard.

    ``stick_to_shard=True`` keeps each rank on its own shard, so every pass reads the same images;
    the padding at the end of a shard is dropped by the loader.
    """
    jpegs, label = fn.readers.file(files=list(files), labels=list(labels), shard_id=shard_id,
                                   num_shards=num_shards, random_shuffle=False, pad_last_batch=True,
                                   stick_to_shard=True, name=READER_NAME)
    images = _decode(jpegs, decoder=decoder, style=style)
    if style == "imagenet":
        images = fn.resize(images, resize_shorter=val_resize)
    # For CIFAR-style images (already image_size) the centre crop is a no-op; it only keeps a
    # stray larger image from breaking the batch, and pads a smaller one instead of failing.
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      crop=(image_size, image_size), out_of_bounds_policy="pad",
                                      mean=list(mean), std=list(std))
    return images, _labels(label, decoder)
