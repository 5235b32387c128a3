"""Offline dataset tools: what prepares, checks and unpacks datasets, apart from what trains on them.

    python -m pipeline.tools.prepare imagenet ...   ILSVRC-2012 archives -> ImageFolder tree (local or s3://)
    python -m pipeline.tools.validate ROOT          images DALI cannot decode -> exclude list (data.exclude_list)
    python -m pipeline.tools.cifar10 ARCHIVE OUT    the official CIFAR-10 download -> image tree

Training never imports them: what it needs at start-up (the demo's digits tree, the extraction of a dataset
archive) lives in ``pipeline.data`` (``digits``, ``archive``), which the tools use too. The tools
read and write through :mod:`pipeline.core.storage` and the data layer's scanning (:mod:`pipeline.data.folder`);
they never import the trainer, the engine or the DALI loader.
"""
