"""data.root = "s3://bucket/prefix": classes listed through pipeline.core.storage (s3fs), images read by DALI's
own S3 client, against a real S3-compatible server (moto_server on 127.0.0.1).

DALI creates its S3 client once per process, from the environment at its first S3 read
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); later changes to the environment are not seen. So this
module shares one server among its tests, and nothing else in the test process reads S3 through DALI.
"""

from __future__ import annotations

import os

import pytest
import torch
from datatree import _jpeg, environ, ids, write_tree

from pipeline.core.storage import Storage
from pipeline.data import DataError, build_source
from pipeline.data.dali_errors import explain_pipeline_error

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, bucket URL) of a module-wide moto_server, with the AWS variables set for DALI and s3fs."""
    import s3fs
    from s3_server import _SERVERS, aws_env, start_moto_server

    with start_moto_server(log_dir=tmp_path_factory.mktemp("moto")) as url:
        # Straight to moto, past the helper's outage forwarder: through it, each DALI pipeline that read
        # S3 takes ~10 s to close its connections (0.15 s against moto itself), and the loader builds one
        # pipeline per epoch.
        backend = getattr(_SERVERS.get(url), "backend_port", None)
        url = f"http://127.0.0.1:{backend}" if backend else url
        with environ(aws_env(url)):
            s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True).mkdir("data")
            yield url, "s3://data"


def upload_tree(tmp_path, s3, name, layout=None, **kw):
    """Write a local ImageFolder tree and copy it to s3://data/<name>; returns (url, {url: id})."""
    local = str(tmp_path / name)
    # PNG: lossless, so the colour that identifies each image survives (JPEG would shift it).
    index = write_tree(local, layout or {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 2}}, ext=".png", **kw)
    store = Storage(f"{s3[1]}/{name}")
    remote = {}
    for path, i in index.items():
        rel = os.path.relpath(path, local)
        store.put(path, rel)
        remote[store.url(rel)] = i
    return store.uri, remote


def source(cfg, root, split="train", rank=0, world_size=1):
    return build_source(
        cfg, split=split, rank=rank, world_size=world_size, device=CPU, seed=0, num_classes=2, root=root
    )


def test_training_and_validation_read_from_s3(tmp_path, s3, make_cfg):
    root, index = upload_tree(tmp_path, s3, "ds")
    cfg = make_cfg(root=root, style="imagenet", image_size=16, val_resize=18, batch_size=2)
    train = source(cfg, root)
    assert train.index.classes == ("a", "b") and all(f.startswith(f"{root}/train/") for f in train.index.files)
    train_ids = {i for u, i in index.items() if "/train/" in u}
    epochs = [[i for x, _ in train for i in ids(x)] for _ in range(2)]  # a new pipeline per epoch
    for got in epochs:
        assert len(got) == len(set(got)) == 12 and set(got) == train_ids
    assert epochs[0] != epochs[1]
    val_ids = sorted(i for u, i in index.items() if "/val/" in u)
    seen = []
    for r in range(2):
        seen += [i for x, _ in source(cfg, root, "val", rank=r, world_size=2) for i in ids(x)]
    assert sorted(seen) == val_ids  # each validation image exactly once across ranks
    # The root may also be given with a trailing slash; prepare_dataset_root leaves URLs to the scan.
    from pipeline.data import prepare_dataset_root

    assert prepare_dataset_root(make_cfg(root=root + "/")) == root


def test_an_unreadable_s3_object_is_named(tmp_path, s3, make_cfg):
    root, _ = upload_tree(tmp_path, s3, "gone")
    cfg = make_cfg(root=root, batch_size=2)
    src = source(cfg, root, "val")
    victim = src.index.files[2]
    Storage(root).delete(victim[len(root) + 1 :])  # listed, then removed before DALI reads it
    with pytest.raises(DataError) as e:
        list(src)
    assert victim in str(e.value) and "S3 Object not found" in str(e.value)


def test_an_empty_s3_object_is_named(tmp_path, s3, make_cfg):
    # DALI 2.4 reports an empty S3 object as "nvImageCodec failure" without a path: the loader's quick
    # scan of the split names it.
    root, _ = upload_tree(tmp_path, s3, "empty")
    Storage(root).write_bytes("val/a/zz-empty.png", b"")
    with pytest.raises(DataError) as e:
        list(source(make_cfg(root=root, batch_size=2), root, "val"))
    assert f"{root}/val/a/zz-empty.png: empty (0 bytes)" in str(e.value)


def test_validate_and_exclude_list_on_s3(tmp_path, s3, make_cfg, capsys):
    from pipeline.tools.validate import main as validate

    root, _ = upload_tree(tmp_path, s3, "checked")
    store = Storage(root)
    store.write_bytes("train/b/empty.JPEG", b"")
    store.write_bytes("train/b/truncated.JPEG", _jpeg(3, (40, 40))[:300])
    listing = f"{s3[1]}/lists/bad.txt"
    assert validate([root, "--no-progress", "--write-list", listing]) == 1
    out = capsys.readouterr().out
    assert f"{root}/train/b/empty.JPEG" in out and f"{root}/train/b/truncated.JPEG" in out
    src = source(make_cfg(root=root, exclude_list=listing, batch_size=1), root)
    assert src.num_samples == 12 and sum(1 for _ in src) == 12


def test_s3_layout_errors(s3, make_cfg):
    with pytest.raises(DataError, match=r"s3://data/nothing-here does not exist or is empty"):
        source(make_cfg(root="s3://data/nothing-here"), "s3://data/nothing-here")
    Storage("s3://data/onlyval").write_bytes("val/a/x.JPEG", b"x")
    with pytest.raises(DataError, match=r"has no train/ folder.*folders there: val"):
        source(make_cfg(root="s3://data/onlyval"), "s3://data/onlyval")
    with pytest.raises(DataError, match=r"bucket 'no-such-bucket' does not exist"):
        source(make_cfg(root="s3://no-such-bucket/x"), "s3://no-such-bucket/x")


def test_a_dali_without_s3_support_says_what_to_do():
    err = RuntimeError(
        "Critical error when building pipeline:\nError in CPU operator `nvidia.dali.fn.readers.file`,\n"
        "encountered:\nS3 filesystem support is not compiled in this build\n"
    )
    msg = str(explain_pipeline_error(err, files=["s3://b/imagenet/train/a/1.JPEG"], root="s3://b/imagenet"))
    assert "this DALI build cannot read s3:// URLs" in msg and "aws s3 sync s3://b/imagenet" in msg
    assert "--data.root" in msg
