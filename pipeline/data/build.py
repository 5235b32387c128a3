"""Entry points: resolve the dataset root, then build a data source for one split and rank."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from pipeline.config import DataConfig, describe_path
from pipeline.core.storage import Storage, StorageError
from pipeline.data.archive import extract_archive, is_archive
from pipeline.data.digits import prepare_digits
from pipeline.data.errors import DataError
from pipeline.data.folder import SplitIndex, is_url, read_exclude_list, scan_dataset
from pipeline.data.loader import DaliSettings, DaliSource
from pipeline.data.memory import InMemorySource
from pipeline.data.pipelines import TrainAugment
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_format import read_manifest
from pipeline.data.shards import LocalShards, ShardSource
from pipeline.data.source import PAPER_SCALES, DataSource, SourceOptions
from pipeline.data.synthetic import SyntheticSource

MEASURE_IMAGES = 500  # about how many images measurement_batch holds (at least one of every class)


def prepare_dataset_root(cfg: DataConfig) -> str:
    """The ImageFolder root for ``cfg``: ``cfg.root`` for ``"folder"``, the digits tree (built
    once under ``cfg.cache_dir``, safe to call from every rank at once) for ``"digits"``, and ``""``
    for ``"synthetic"``, which reads nothing."""
    if cfg.source == "synthetic":
        return ""
    if cfg.source == "digits":
        return prepare_digits(cfg.cache_dir)
    if cfg.source == "folder":
        if not cfg.root:
            raise DataError(
                "data.root is empty but data.source = 'folder': set --data.root to an ImageFolder "
                f"directory (with {cfg.train_dir}/ and {cfg.val_dir}/ inside), or use "
                "--data.source=digits for the offline demo set"
            )
        if is_url(cfg.root):
            return cfg.root.rstrip("/")  # listed (and checked) through pipeline.core.storage when a source is built
        if is_archive(cfg.root):
            return extract_archive(cfg.root, cache_dir=cfg.cache_dir, sha256=cfg.root_sha256)
        if not os.path.isdir(cfg.root):
            raise DataError(
                f"dataset root {cfg.root} {describe_path(cfg.root)}, expected a folder (or a .tar.gz/.tgz/.tar "
                f"archive); set --data.root to a folder holding {cfg.train_dir}/<class>/<image> and "
                f"{cfg.val_dir}/<class>/<image>"
            )
        return cfg.root
    raise DataError(f"data.source = {cfg.source!r} is not one of 'folder', 'digits', 'synthetic'")


def resolve_decoder(decoder: str, device: torch.device) -> Literal["cpu", "mixed"]:
    """``"auto"`` decodes on the GPU when the outputs are headed for one."""
    device = torch.device(device)
    if decoder == "cpu":
        return "cpu"
    if decoder == "mixed":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise DataError(
                f"data.decoder = 'mixed' decodes on the GPU but the device is {device} "
                f"(CUDA available: {torch.cuda.is_available()}); set --data.decoder=cpu or auto"
            )
        return "mixed"
    if decoder == "auto":
        return "mixed" if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    raise DataError(f"data.decoder = {decoder!r} is not one of 'auto', 'cpu', 'mixed'")


def build_source(
    cfg: DataConfig,
    *,
    split: Literal["train", "val"],
    rank: int,
    world_size: int,
    device: torch.device,
    seed: int,
    num_classes: int,
    root: str | None = None,
    eval_mode: Literal["center", "10crop", "multiscale"] = "center",
    scales: tuple[int, ...] = PAPER_SCALES,
) -> DataSource:
    """The data of ``split`` for global ``rank`` of ``world_size``, delivered on ``device``.

    ``root`` defaults to :func:`prepare_dataset_root` (pass its result to avoid re-checking).
    ``seed`` is the run's base seed; each (rank, split) derives its own stream from it. Raises
    :class:`DataError` for any dataset or setting problem, before a pipeline starts.

    Training sources yield the same number of batches on every rank; evaluation sources yield
    every image exactly once across ranks, so their batch counts may differ between ranks (reduce
    sums after the loop). See :mod:`pipeline.data.loader`.

    ``eval_mode`` (val only, ImageNet style) picks the test views: ``"center"`` crop, ``"10crop"``
    (images of shape (N, 10, 3, H, W)) or ``"multiscale"`` (the whole image at each of ``scales``:
    a list per scale of per-image (3, H, W) tensors).
    """
    if split not in ("train", "val"):
        raise DataError(f"split = {split!r}: must be 'train' or 'val'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if cfg.batch_size < 1:
        raise DataError(f"data.batch_size = {cfg.batch_size}: must be >= 1")
    batch_size = cfg.batch_size
    if split == "val" and cfg.source != "synthetic":  # synthetic batches keep one shape on both splits
        batch_size = cfg.val_batch_size or cfg.batch_size
    options = SourceOptions(
        split=split,
        rank=rank,
        world_size=world_size,
        device=device,
        seed=seed,
        num_classes=num_classes,
        batch_size=batch_size,
    )
    if cfg.source == "synthetic":
        return SyntheticSource(options, image_size=cfg.image_size, num_batches=cfg.synthetic_batches)

    if root is None:
        root = prepare_dataset_root(cfg)
    settings = _dali_settings(
        cfg, root=root, decoder=resolve_decoder(cfg.decoder, device), eval_mode=eval_mode, scales=scales
    )
    if cfg.format == "shards":
        return _shard_source(cfg, options, root=root, num_classes=num_classes, settings=settings)
    index = _scan(cfg, root=root, split=split, num_classes=num_classes)
    return _index_source(cfg, options, index, root=root, settings=settings)


def _scan(cfg: DataConfig, *, root: str, split: str, num_classes: int) -> SplitIndex:
    """The file index of ``split`` of an image-folder dataset, with the exclude list applied."""
    return scan_dataset(
        root,
        split_dir=cfg.train_dir if split == "train" else cfg.val_dir,
        train_dir=cfg.train_dir,
        val_dir=cfg.val_dir,
        num_classes=num_classes,
        fixes=read_exclude_list(cfg.exclude_list, root=root) if cfg.exclude_list else None,
    )


def _index_source(
    cfg: DataConfig, options: SourceOptions, index: SplitIndex, *, root: str, settings: DaliSettings
) -> DataSource:
    """The source of an image-folder split's ``index``: decoded once into device memory, or read by DALI."""
    if cfg.in_memory:
        return InMemorySource(
            index,
            options,
            image_size=cfg.image_size,
            mean=cfg.mean,
            std=cfg.std,
            flip=cfg.flip,
            decoder=settings.decoder,
            num_threads=cfg.num_threads,
            root=root,
            mean_image=settings.mean_image,
        )
    return DaliSource(index, options, settings=settings, root=root)


def measurement_batch(
    cfg: DataConfig, *, device: torch.device, num_classes: int, root: str | None = None, images: int = MEASURE_IMAGES
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, class-stratified set of validation images, preprocessed as the evaluation sees them: the first
    ``ceil(images / classes)`` files of every class (500 for CIFAR-10: 50 per class; ImageNet: one per class),
    the same for every run on the same data, whatever its rank count. Figure 7 measures the layer responses on it:
    the first validation batch in file order would be one class. Returns ``(images, labels)`` on ``device``.

    Synthetic data has no classes: its first validation batch. Shards (written in one fixed order) are streamed
    on this process until every class has its images, once per run."""
    per_class = max(1, math.ceil(images / num_classes))
    if root is None:
        root = prepare_dataset_root(cfg)
    options = SourceOptions(
        split="val",
        rank=0,
        world_size=1,
        device=device,
        seed=0,
        num_classes=num_classes,
        batch_size=cfg.val_batch_size or cfg.batch_size,
    )
    if cfg.source == "synthetic":
        return next(iter(SyntheticSource(options, image_size=cfg.image_size, num_batches=1)))
    settings = _dali_settings(
        cfg, root=root, decoder=resolve_decoder(cfg.decoder, device), eval_mode="center", scales=PAPER_SCALES
    )
    if cfg.format == "shards":
        source = _shard_source(cfg, options, root=root, num_classes=num_classes, settings=settings)
        return _stratified(iter(source), per_class=per_class, num_classes=num_classes)
    index = _scan(cfg, root=root, split="val", num_classes=num_classes)
    taken: dict[int, int] = {}
    chosen = []
    for i, label in enumerate(index.labels):  # grouped by class, sorted within: the first files of each class
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(i)
    subset = SplitIndex(
        path=index.path,
        classes=index.classes,
        files=tuple(index.files[i] for i in chosen),
        labels=tuple(index.labels[i] for i in chosen),
    )
    batches = list(_index_source(cfg, options, subset, root=root, settings=settings))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _stratified(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, per_class: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of every class from a stream of batches (stops once all are there)."""
    kept_x: list[torch.Tensor] = []
    kept_y: list[torch.Tensor] = []
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for x, y in batches:
        rank_in_class = torch.zeros_like(y, device="cpu")
        labels = y.cpu()
        for k, label in enumerate(labels.tolist()):
            rank_in_class[k] = counts[label]
            counts[label] += 1
        keep = (rank_in_class < per_class).to(y.device)
        kept_x.append(x[keep])
        kept_y.append(y[keep])
        if bool((counts >= per_class).all()):
            break
    return torch.cat(kept_x), torch.cat(kept_y)


def _dali_settings(
    cfg: DataConfig,
    *,
    root: str,
    decoder: Literal["cpu", "mixed"],
    eval_mode: Literal["center", "10crop", "multiscale"],
    scales: tuple[int, ...],
) -> DaliSettings:

    # PCA lighting is ImageNet's colour augmentation; CIFAR-style training has none.
    augmentation = TrainAugment(
        flip=cfg.flip,
        augment=cfg.augment,
        scale=(cfg.scale[0], cfg.scale[1]),
        lighting=cfg.lighting if cfg.style == "imagenet" else 0.0,
    )
    return DaliSettings(
        style=cfg.style,
        image_size=cfg.image_size,
        val_resize=cfg.val_resize,
        mean=cfg.mean,
        std=cfg.std,
        num_threads=cfg.num_threads,
        prefetch=cfg.prefetch,
        decoder=decoder,
        augmentation=augmentation,
        mean_image=load_mean_image(cfg.mean_image, root=root, image_size=cfg.image_size) if cfg.mean_image else None,
        eval_mode=eval_mode,
        scales=scales,
    )


def _shard_source(
    cfg: DataConfig, options: SourceOptions, *, root: str, num_classes: int, settings: DaliSettings
) -> DataSource:
    """A :class:`~pipeline.data.shards.ShardSource` for the sharded split folder of ``options.split`` under ``root``."""

    split_dir = cfg.train_dir if options.split == "train" else cfg.val_dir
    store = Storage(root).child(split_dir)
    manifest = read_manifest(store)
    if manifest.num_classes != num_classes:
        raise DataError(
            f"{store.url('manifest.json')} has {manifest.num_classes} classes but the model has {num_classes}; set "
            f"--model.num_classes={manifest.num_classes}"
        )
    files = (
        ShardCache(store, manifest, cache_dir=cfg.cache_dir, cache_bytes=cfg.cache_bytes)
        if store.remote
        else LocalShards(store.root)
    )
    return ShardSource(manifest, options, files=files, split_uri=store.uri, settings=settings)


def load_mean_image(path: str, *, root: str, image_size: int) -> np.ndarray:
    """The per-pixel mean image (H x W x 3 float32, 0-255) at ``path`` (relative paths are under ``root``)."""

    full = (
        path
        if is_url(path) or os.path.isabs(path)
        else (f"{root.rstrip('/')}/{path}" if is_url(root) else os.path.join(root, path))
    )
    parent, name = full.rsplit("/", 1)
    try:
        data = Storage(parent).read_bytes(name)
        mean = np.load(io.BytesIO(data), allow_pickle=False)
    except StorageError as e:
        raise DataError(
            f"data.mean_image = {path!r}: cannot read {full} ({e}); write it with `python -m "
            f"pipeline.tools.prepare mean-image {root}` or set data.mean_image = '' (per-channel "
            f"mean)"
        ) from e
    except ValueError as e:
        raise DataError(f"data.mean_image = {path!r}: {full} is not a .npy array ({e})") from e
    if mean.shape != (image_size, image_size, 3):
        raise DataError(
            f"data.mean_image = {path!r}: {full} has shape {mean.shape}, but data.image_size = "
            f"{image_size} needs ({image_size}, {image_size}, 3); recompute it with `python -m "
            f"pipeline.tools.prepare mean-image {root} --size {image_size}`"
        )
    return mean.astype(np.float32)
