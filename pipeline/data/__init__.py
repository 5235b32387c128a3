"""Data layer: ImageFolder datasets through NVIDIA DALI, the offline digits set, synthetic data.

    root = prepare_dataset_root(cfg.data)          # every rank; builds the digits tree once
    train = build_source(cfg.data, split="train", rank=rank, world_size=world, device=device,
                         seed=cfg.seed, num_classes=cfg.model.num_classes, root=root)
    for images, labels in train: ...               # one epoch, already on `device`
    state = train.state_dict()                     # per rank; load_state_dict() resumes exactly

Commands: ``python -m pipeline.tools.prepare imagenet`` (ILSVRC-2012 archives -> ImageFolder tree, local
or s3://) and ``python -m pipeline.tools.validate ROOT`` (images DALI cannot decode -> exclude list).
"""

from pipeline.data.build import build_source, measurement_batch, prepare_dataset_root, resolve_decoder
from pipeline.data.errors import DataError
from pipeline.data.source import DataSource

__all__ = ["DataError", "DataSource", "build_source", "measurement_batch", "prepare_dataset_root", "resolve_decoder"]
