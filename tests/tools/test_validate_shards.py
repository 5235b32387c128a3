"""python -m pipeline.tools.validate on a sharded dataset: every shard checked against its manifest (size,
sha256, DALI index, sample count from the tar headers), each bad shard named by its URI; locally and on S3."""

from __future__ import annotations

import os

import pytest
from datatree import write_tree

from pipeline.core.storage import Storage
from pipeline.tools.shard_writer import prepare_shards
from pipeline.tools.validate import main, sharded_splits, validate_shards

LAYOUT = {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}}


def make_shards(tmp_path, out: str) -> dict:
    root = str(tmp_path / "tree")
    write_tree(root, LAYOUT)
    return prepare_shards(root, out, shard_bytes=10240, workers=2, progress=False)  # 4 samples per shard


def damage(store: Storage, shards) -> dict[str, str]:
    """Truncate the first train shard, flip a byte in the second (same size), drop the third's index;
    returns {uri: what the report must say about it}."""
    a, b, c = shards[:3]
    data = store.read_bytes(f"train/{a.name}")
    store.write_bytes(f"train/{a.name}", data[: len(data) // 2])
    data = bytearray(store.read_bytes(f"train/{b.name}"))
    data[600] ^= 0xFF  # inside the first image, past its header block
    store.write_bytes(f"train/{b.name}", bytes(data))
    store.delete(f"train/{c.index}")
    return {
        store.url(f"train/{a.name}"): "manifest says",
        store.url(f"train/{b.name}"): "sha256 differs",
        store.url(f"train/{c.name}"): "DALI index",
    }


def test_intact_shards_pass_and_each_bad_shard_is_named(tmp_path, capsys):
    out = str(tmp_path / "shards")
    written = make_shards(tmp_path, out)
    assert [s.uri for s in sharded_splits(out)] == [f"{out}/train", f"{out}/val"]
    assert [s.uri for s in sharded_splits(f"{out}/val")] == [f"{out}/val"]
    assert validate_shards(out, progress=False) == ([], 3 + 1)
    assert main([out, "--no-progress"]) == 0
    assert "checked 4 shards" in capsys.readouterr().out
    expected = damage(Storage(out), written["train"].shards)
    problems, _ = validate_shards(out, progress=False)
    for uri, what in expected.items():
        assert any(p.startswith(f"{uri}: ") and what in p for p in problems), (uri, problems)
    assert all(p.split(": ", 1)[0] in expected for p in problems)  # the intact shards are not named
    truncated = [p for p in problems if p.startswith(next(iter(expected)))]
    assert any("samples" in p for p in truncated), truncated  # counted from what is left of its tar headers
    assert main([f"{out}/train", "--no-progress"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert {line.split()[1].rstrip(":") for line in printed if line.startswith("BAD ")} == set(expected)


def test_a_missing_shard_and_a_wrong_manifest(tmp_path):
    out = str(tmp_path / "shards")
    written = make_shards(tmp_path, out)
    os.unlink(f"{out}/val/{written['val'].shards[0].name}")
    problems, _ = validate_shards(out, progress=False)
    assert problems == [
        f"{out}/val/shard-000000.tar: missing or unreadable (cannot stat {out}/val/shard-000000.tar: it does not exist)"
    ]
    with open(f"{out}/train/manifest.json", "w") as f:
        f.write('{"format": "webdataset-dali", "version": 1}')
    with pytest.raises(Exception, match="not a shard manifest"):
        validate_shards(out, progress=False)


def test_an_imagefolder_tree_is_not_taken_for_shards(tmp_path):
    root = str(tmp_path / "tree")
    write_tree(root, LAYOUT)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        f.write('{"format": 1, "splits": {}}')  # what prepare imagenet writes at a tree's root
    assert sharded_splits(root) == []


@pytest.mark.slow
def test_shards_on_s3(tmp_path, s3_bucket, s3_endpoint, monkeypatch, capsys):
    from s3_server import aws_env

    for k, v in aws_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    out = f"{s3_bucket}/shards"
    written = make_shards(tmp_path, out)
    assert validate_shards(out, progress=False) == ([], 4)
    expected = damage(Storage(out), written["train"].shards)
    assert main([out, "--no-progress"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert {line.split()[1].rstrip(":") for line in printed if line.startswith("BAD ")} == set(expected)
