"""CIFAR-10 as an image tree: the official download turned into PNGs (the JPEG archive's hash is in pipeline.data.archive).

    python -m pipeline.tools.cifar10 cifar-10-python.tar.gz OUT     # OUT/{train,test}/<class>/NNNNN.png

for ``--data.root=OUT`` when the CIFAR-10 JPEG archive that the configs name (extracted by
:mod:`pipeline.data.archive`) is not at hand.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from pipeline.core.storage import Storage
from pipeline.data.errors import DataError

# -- CIFAR-10 from the official download ---------------------------------------------------------------------
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def tree_from_python_archive(archive: str, out: str) -> str:
    """Write the official ``cifar-10-python.tar.gz`` as ``out/{train,test}/<class>/NNNNN.png`` (lossless).

    The batches are numpy pickles (the format the CIFAR page documents); only that archive's own members are
    unpickled, so pass the file downloaded from https://www.cs.toronto.edu/~kriz/cifar.html."""
    import pickle

    import numpy as np
    from PIL import Image

    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    counts = {"train": [0] * 10, "test": [0] * 10}
    source, name = Storage.of_file(archive)
    tree = Storage(out)
    with source.open(name) as raw, tarfile.open(fileobj=raw) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for split, batches in names.items():
            for b in batches:
                if b not in members:
                    raise DataError(f"{archive} has no {b}: not the python version of CIFAR-10")
                f = tar.extractfile(members[b])
                assert f is not None
                batch = pickle.load(f, encoding="bytes")
                images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                for img, label in zip(images, batch[b"labels"], strict=True):
                    png = io.BytesIO()
                    Image.fromarray(img).save(png, format="PNG")
                    tree.write_bytes(f"{split}/{CIFAR10_CLASSES[label]}/{counts[split][label]:05d}.png", png.getvalue())
                    counts[split][label] += 1
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        print(
            "usage: python -m pipeline.tools.cifar10 cifar-10-python.tar.gz OUT_DIR\n"
            "writes OUT_DIR/train/<class>/*.png and OUT_DIR/test/<class>/*.png; then train with\n"
            "--data.root=OUT_DIR --data.root_sha256=''",
            file=sys.stderr,
        )
        sys.exit(2)
    print(tree_from_python_archive(sys.argv[1], sys.argv[2]))
