"""Entry points: resolve the dataset root, then build a data source for one split and rank."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import torch

from .errors import DataError
from .source import DataSource

if TYPE_CHECKING:
    from pipeline.config import DataConfig


def prepare_dataset_root(cfg: DataConfig) -> str:
    """The ImageFolder root for ``cfg``: ``cfg.root`` for ``"folder"``, the digits tree (built
    once under ``cfg.cache_dir``, safe to call from every rank at once) for ``"digits"``, and ``""``
    for ``"synthetic"``, which reads nothing."""
    if cfg.source == "synthetic":
        return ""
    if cfg.source == "digits":
        from .digits import prepare_digits

        return prepare_digits(cfg.cache_dir)
    if cfg.source == "folder":
        if not cfg.root:
            raise DataError("data.root is empty but data.source = 'folder': set --data.root to an ImageFolder "
                            f"directory (with {cfg.train_dir}/ and {cfg.val_dir}/ inside), or use "
                            "--data.source=digits for the offline demo set")
        if not os.path.isdir(cfg.root):
            raise DataError(f"dataset root {cfg.root} does not exist; set --data.root to a folder holding "
                            f"{cfg.train_dir}/<class>/<image> and {cfg.val_dir}/<class>/<image>")
        return cfg.root
    raise DataError(f"data.source = {cfg.source!r} is not one of 'folder', 'digits', 'synthetic'")


def resolve_decoder(decoder: str, device: torch.device) -> Literal["cpu", "mixed"]:
    """``"auto"`` decodes on the GPU when the outputs are headed for one."""
    device = torch.device(device)
    if decoder == "cpu":
        return "cpu"
    if decoder == "mixed":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise DataError(f"data.decoder = 'mixed' decodes on the GPU but the device is {device} "
                            f"(CUDA available: {torch.cuda.is_available()}); set --data.decoder=cpu or auto")
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
) -> DataSource:
    """The data of ``split`` for global ``rank`` of ``world_size``, delivered on ``device``.

    ``root`` defaults to :func:`prepare_dataset_root` (pass its result to avoid re-checking).
    ``seed`` is the run's base seed; each (rank, split) derives its own stream from it. Raises
    :class:`DataError` for any dataset or setting problem, before a pipeline starts.

    Training sources yield the same number of batches on every rank; evaluation sources yield
    every image exactly once across ranks, so their batch counts may differ between ranks (reduce
    sums after the loop). See :mod:`pipeline.data.loader`.
    """
    if split not in ("train", "val"):
        raise DataError(f"split = {split!r}: must be 'train' or 'val'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if cfg.batch_size < 1:
        raise DataError(f"data.batch_size = {cfg.batch_size}: must be >= 1")
    device = torch.device(device)
    if cfg.source == "synthetic":
        from .synthetic import SyntheticSource

        return SyntheticSource(batch_size=cfg.batch_size, image_size=cfg.image_size, num_batches=cfg.synthetic_batches,
                               num_classes=num_classes, rank=rank, world_size=world_size, device=device, seed=seed,
                               split=split)

    from .folder import scan_dataset
    from .loader import DaliSource

    if root is None:
        root = prepare_dataset_root(cfg)
    decoder = resolve_decoder(cfg.decoder, device)
    index = scan_dataset(root, split_dir=cfg.train_dir if split == "train" else cfg.val_dir,
                         train_dir=cfg.train_dir, val_dir=cfg.val_dir, num_classes=num_classes)
    return DaliSource(index, split=split, rank=rank, world_size=world_size, device=device, seed=seed,
                      num_classes=num_classes, batch_size=cfg.batch_size, style=cfg.style, image_size=cfg.image_size,
                      val_resize=cfg.val_resize, mean=cfg.mean, std=cfg.std, num_threads=cfg.num_threads,
                      prefetch=cfg.prefetch, decoder=decoder)
