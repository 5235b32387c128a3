"""Offline dataset tools: what prepares, checks and unpacks datasets, apart from what trains on them.

    python -m pipeline.tools.prepare imagenet ...   ILSVRC-2012 archives -> ImageFolder tree (local or s3://)
    python -m pipeline.tools.validate ROOT          images DALI cannot decode -> exclude list (data.exclude_list)
    python -m pipeline.tools.cifar10 ARCHIVE OUT    the official CIFAR-10 download -> image tree

Training uses two of them at start-up, through ``pipeline.data.build.prepare_dataset_root``: the digits
tree of the demo (:mod:`.digits`) and the extraction of a dataset archive (:mod:`.archive`). The tools
read and write through :mod:`pipeline.storage` and the data layer's scanning (:mod:`pipeline.data.folder`);
they never import the trainer, the engine or the DALI loader.
"""
