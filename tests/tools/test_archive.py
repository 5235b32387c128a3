"""Dataset archives: extracted once and atomically, verified by sha256, clear errors; and real CIFAR-10.

The real-data tests need ``../shared/datasets/cifar10-jpeg.tar.gz`` beside the checkout and skip, saying
so, where it is absent (a fresh clone).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, prepare_dataset_root
from pipeline.data import archive as archives
from pipeline.tools import cifar10

REPO = Path(__file__).resolve().parents[2]
SHARED_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
needs_cifar = pytest.mark.skipif(
    not SHARED_ARCHIVE.is_file(),
    reason=f"the real CIFAR-10 archive is not at "
    f"{SHARED_ARCHIVE} (a fresh clone has no ../shared); see pipeline/tools/cifar10.py",
)


def make_archive(path: Path, files: dict[str, bytes], *, top: str = "ds") -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jpeg_bytes(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


TREE = {
    f"{split}/{c}/{i}.jpg": jpeg_bytes(40 * i + (100 if c == "b" else 0))
    for split in ("train", "test")
    for c in ("a", "b")
    for i in range(2)
}


def test_extracts_once_into_the_cache_and_returns_the_top_folder(tmp_path, monkeypatch):
    sha = make_archive(tmp_path / "ds.tar.gz", TREE)
    root = archives.extract_archive(str(tmp_path / "ds.tar.gz"), cache_dir=str(tmp_path / "cache"), sha256=sha)
    assert root == str(tmp_path / "cache" / "ds" / "ds")
    assert sorted(os.listdir(root)) == ["test", "train"]
    assert (Path(root) / "train" / "b" / "1.jpg").read_bytes() == TREE["train/b/1.jpg"]
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".ds-")], "no temporary folders left"

    def no_second_extraction(*a, **k):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(archives, "_unpack", no_second_extraction)
    monkeypatch.setattr(archives, "sha256_of", no_second_extraction)
    assert archives.extract_archive(str(tmp_path / "ds.tar.gz"), cache_dir=str(tmp_path / "cache"), sha256=sha) == root


def test_archive_without_a_single_top_folder_is_its_own_root(tmp_path):
    make_archive(tmp_path / "flat.tar", TREE, top="")
    root = archives.extract_archive(str(tmp_path / "flat.tar"), cache_dir=str(tmp_path / "cache"))
    assert root == str(tmp_path / "cache" / "flat") and sorted(os.listdir(root))[-2:] == ["test", "train"]


def test_a_changed_archive_is_extracted_again(tmp_path):
    make_archive(tmp_path / "ds.tgz", TREE)
    root = archives.extract_archive(str(tmp_path / "ds.tgz"), cache_dir=str(tmp_path / "cache"))
    changed = {**TREE, "train/a/9.jpg": jpeg_bytes(7)}
    time.sleep(0.01)
    make_archive(tmp_path / "ds.tgz", changed)
    again = archives.extract_archive(str(tmp_path / "ds.tgz"), cache_dir=str(tmp_path / "cache"))
    assert again == root and (Path(root) / "train" / "a" / "9.jpg").is_file()


def test_bad_sha256_refuses_and_leaves_nothing(tmp_path):
    make_archive(tmp_path / "ds.tar.gz", TREE)
    with pytest.raises(DataError, match="has sha256 .* but data.root_sha256 = 0+"):
        archives.extract_archive(str(tmp_path / "ds.tar.gz"), cache_dir=str(tmp_path / "cache"), sha256="0" * 64)
    assert [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")] == []


def test_missing_archive_says_how_to_get_cifar10(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*cs\.toronto\.edu/~kriz/cifar"):
        archives.extract_archive(str(tmp_path / "nope.tar.gz"), cache_dir=str(tmp_path / "cache"))


def test_corrupt_archive_is_a_data_error(tmp_path):
    make_archive(tmp_path / "ds.tar.gz", TREE)
    data = (tmp_path / "ds.tar.gz").read_bytes()
    (tmp_path / "ds.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot be extracted"):
        archives.extract_archive(str(tmp_path / "ds.tar.gz"), cache_dir=str(tmp_path / "cache"))


def test_links_in_an_archive_are_refused(tmp_path):
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("ds/train/a/link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="link"):
        archives.extract_archive(str(tmp_path / "evil.tar"), cache_dir=str(tmp_path / "cache"))


def test_concurrent_callers_extract_once(tmp_path, monkeypatch):
    sha = make_archive(tmp_path / "ds.tar.gz", TREE)
    calls = []
    real = archives._unpack

    def counting(*a, **k):
        calls.append(1)
        time.sleep(0.2)
        real(*a, **k)

    monkeypatch.setattr(archives, "_unpack", counting)
    roots: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: roots.append(
                archives.extract_archive(str(tmp_path / "ds.tar.gz"), cache_dir=str(tmp_path / "cache"), sha256=sha)
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(roots)) == 1 and len(roots) == 4


def test_a_folder_not_extracted_here_is_never_deleted(tmp_path):
    make_archive(tmp_path / "ds.tar.gz", TREE)
    mine = tmp_path / "cache" / "ds"
    (mine / "train" / "a").mkdir(parents=True)  # e.g. a user's own tree where the extraction would go
    (mine / "train" / "a" / "keep.jpg").write_bytes(b"precious")
    with pytest.raises(
        DataError,
        match=re.escape(str(mine)) + r" exists but was not made by this pipeline.*move it away.*"
        r"--data.cache_dir",
    ):
        archives.extract_archive(str(tmp_path / "ds.tar.gz"), cache_dir=str(tmp_path / "cache"))
    assert (mine / "train" / "a" / "keep.jpg").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path / "cache")) == [".ds.lock", "ds"]  # no temporary folders left


def test_prepare_dataset_root_takes_an_archive_as_data_root(tmp_path):
    sha = make_archive(tmp_path / "ds.tar.gz", TREE)
    cfg = DataConfig(source="folder", root=str(tmp_path / "ds.tar.gz"), root_sha256=sha, cache_dir=str(tmp_path / "c"))
    root = prepare_dataset_root(cfg)
    assert json.loads((Path(root).parent / ".complete").read_text())["root"] == "ds"
    assert os.path.isdir(os.path.join(root, "test", "a"))


def test_official_python_download_becomes_an_image_tree(tmp_path):
    import pickle

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 9, 0]}
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, batch in batches.items():
            data = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "tree"
    cifar10.tree_from_python_archive(str(tmp_path / "cifar-10-python.tar.gz"), str(out))
    assert sorted(os.listdir(out / "train")) == ["airplane", "truck"]
    assert len(os.listdir(out / "train" / "airplane")) == 10 and len(os.listdir(out / "test" / "truck")) == 1
    first = np.asarray(Image.open(out / "train" / "airplane" / "00000.png"))
    assert np.array_equal(first, batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))


# -- the real CIFAR-10 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> str:
    cache = tmp_path_factory.mktemp("cifar-cache")
    return archives.extract_archive(str(SHARED_ARCHIVE), cache_dir=str(cache), sha256=archives.CIFAR10_SHA256)


@needs_cifar
@pytest.mark.slow
def test_real_cifar10_archive_has_the_paper_splits(cifar_root):
    from pipeline.data.folder import scan_dataset

    train = scan_dataset(cifar_root, split_dir="train", train_dir="train", val_dir="test", num_classes=10)
    test = scan_dataset(cifar_root, split_dir="test", train_dir="train", val_dir="test", num_classes=10)
    assert (len(train), len(test)) == (50000, 10000)
    assert train.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert all(train.labels.count(c) == 5000 for c in range(10))


@needs_cifar
@pytest.mark.slow
def test_real_cifar10_trains_through_the_full_path(cifar_root, tmp_path, monkeypatch):
    """A short run of the Table 6 ResNet-20 config on the real archive: in-memory source, DeepSpeed, checkpoint."""
    from pipeline.config import load_config
    from pipeline.core.stop import StopFlag
    from pipeline.train import run

    cfg = load_config(
        REPO / "configs/cifar10/cifar_resnet20.toml",
        [
            f"--data.root={SHARED_ARCHIVE}",
            f"--data.cache_dir={Path(cifar_root).parents[1]}",
            "--schedule.max_steps=12",
            "--schedule.milestones=[6]",
            "--log_every=4",
            "--data.batch_size=64",
            "--progress=false",
            "--tracking.enabled=false",
            f"--output_dir={tmp_path}/out",
            f"--checkpoint.uri={tmp_path}/ckpt",
            "--checkpoint.every_minutes=0",
        ],
    )
    assert cfg.data.in_memory and cfg.data.val_dir == "test"
    # DeepSpeed's CPU op build folder, one per checkout (see tests/test_bench.py).
    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    )
    env = {
        k: os.environ.get(k)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    try:
        outcome = run(cfg, stop=StopFlag())  # not installed: the test process keeps its own signal handlers
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert outcome.exit_code == 0
    losses = [r["train_loss"] for r in outcome.history if "train_loss" in r]
    assert len(losses) == 3 and all(0 < x < 5 for x in losses)
    # 10,000 test images were scored; 12 steps leave the net near chance but it must have produced a number.
    assert 0 <= outcome.final_val["val_top1_error"] <= 100
    assert any((tmp_path / "ckpt").rglob("*")), "the run wrote its checkpoint"
