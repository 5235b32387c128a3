"""Sharded splits (data.format = "shards"): exactly-once per epoch over ranks, seeded shuffling, exact resume and
errors, read by real DALI on the CPU; an s3:// root through the node-local shard cache against a real
moto_server behind the delaying forwarder, with S3 requests counted at the server.

Several ranks are simulated in one process by building one source per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
from datatree import _png, environ, ids, record_reader, roundtrip, take, write_sharded_split

from pipeline.config import ConfigError, DataConfig
from pipeline.core.storage import Storage
from pipeline.data import DataError, build_source
from pipeline.data import shards as shards_module
from pipeline.data.shard_format import read_manifest, write_manifest, write_shard
from pipeline.data.shards import ShardSource

CPU = torch.device("cpu")
TRAIN = [7, 5, 9, 3, 6, 4]  # uneven shards, 34 samples: not divisible by 2, 3 or the batch size
VAL = [4, 3, 4]


@pytest.fixture
def sharded(tmp_path):
    """(root, {id: label} of train, {id: label} of val) of a local sharded dataset."""
    root = str(tmp_path / "sharded")
    train = write_sharded_split(os.path.join(root, "train"), TRAIN)
    val = write_sharded_split(os.path.join(root, "val"), VAL, first_id=100)
    return root, train, val


def source(cfg, root, split="train", rank=0, world_size=1, seed=0) -> ShardSource:
    src = build_source(
        cfg, split=split, rank=rank, world_size=world_size, device=CPU, seed=seed, num_classes=2, root=root
    )
    assert isinstance(src, ShardSource)
    return src


def shard_cfg(make_cfg, root, **kw):
    return make_cfg(root=root, format="shards", **kw)


def piece_ids(src, pieces) -> list[int]:
    """The ids a list of (shard, first, end) pieces holds (write_sharded_split numbers them in shard order)."""
    starts = np.cumsum([0] + [s.samples for s in src.manifest.shards])
    return [int(starts[s]) + j for s, first, end in pieces for j in range(first, end)]


# -- exactly once ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_reads_every_sample_exactly_once_per_epoch_over_ranks(sharded, make_cfg, world_size):
    root, train, _ = sharded
    cfg = shard_cfg(make_cfg, root, batch_size=3)
    ranks = [source(cfg, root, rank=r, world_size=world_size, seed=5) for r in range(world_size)]
    n = sum(TRAIN)
    expected_len = (n // world_size) // 3
    assert [len(s) for s in ranks] == [expected_len] * world_size
    reader = [record_reader(s) for s in ranks]
    orders, seen_over_epochs = [], set()
    for epoch in range(3):
        produced, seen = Counter(), []
        for r, s in enumerate(ranks):
            pieces = s.pieces(epoch)
            start = len(reader[r])
            batches = list(s)
            assert len(batches) == expected_len
            seen += [i for x, _ in batches for i in ids(x)]
            for x, y in batches:  # labels come from the .cls members
                assert y.tolist() == [train[i] for i in ids(x)]
            got = [i for b in reader[r][start:] for i in b]
            real = n * (r + 1) // world_size - n * r // world_size
            assert len(piece_ids(s, pieces)) == real and len(got) == -(-real // 3) * 3
            # DALI read exactly the rank's run first, shuffled; the last reader batch ran on (dropped).
            assert sorted(got[:real]) == sorted(piece_ids(s, pieces)) and got[:real] != piece_ids(s, pieces)
            produced.update(got[:real])
        # Every training sample is read exactly once per epoch across the ranks ...
        assert produced == Counter(train.keys())
        # ... and the yielded batches are disjoint.
        assert len(seen) == len(set(seen)) == world_size * expected_len * 3
        seen_over_epochs |= set(seen)
        orders.append(tuple(seen))
    assert len(set(orders)) == len(orders)  # a new order every epoch
    assert all(s.epoch == 3 for s in ranks)


@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 2)])
def test_val_covers_every_sample_once_in_order(sharded, make_cfg, world_size, batch_size):
    root, _, val = sharded
    cfg = shard_cfg(make_cfg, root, batch_size=batch_size)
    ranks = [source(cfg, root, split="val", rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(2):
        got = [i for s in ranks for x, _ in s for i in ids(x)]
        assert got == sorted(val)  # manifest order, each once, padding dropped


def test_shuffle_is_seeded_and_changes_every_epoch(sharded, make_cfg):
    root, _, _ = sharded
    cfg = shard_cfg(make_cfg, root, batch_size=4)

    def epochs(seed):
        src = source(cfg, root, seed=seed)
        return [[i for x, _ in src for i in ids(x)] for _ in range(2)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert a == b and a[0] != a[1] and a != c


# -- exact resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("n_before", [0, 3, 9])  # start, mid-epoch, into epoch 2 (8 batches per epoch at 1 rank)
def test_exact_resume_mid_epoch(sharded, make_cfg, world_size, n_before):
    root, _, _ = sharded
    cfg = shard_cfg(make_cfg, root, batch_size=4, style="imagenet", prefetch=2)
    for rank in range(world_size):
        src = source(cfg, root, rank=rank, world_size=world_size, seed=3)
        take(src, n_before)
        state = roundtrip(src.state_dict())
        after = take(src, 8)
        resumed = source(cfg, root, rank=rank, world_size=world_size, seed=3)
        resumed.load_state_dict(state)
        again = take(resumed, 8)
        for (x1, y1), (x2, y2) in zip(after, again, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_state_of_another_sharding_is_refused(sharded, make_cfg, tmp_path):
    root, _, _ = sharded
    cfg = shard_cfg(make_cfg, root)
    state = source(cfg, root).state_dict()
    other = str(tmp_path / "other")
    write_sharded_split(os.path.join(other, "train"), [17, 17])  # the same 34 samples, other shards
    with pytest.raises(DataError, match="num_shards"):
        source(shard_cfg(make_cfg, other), other).load_state_dict(state)


# -- errors and config ----------------------------------------------------------------------------


def test_a_truncated_local_shard_is_named(sharded, make_cfg):
    root, _, _ = sharded
    victim = os.path.join(root, "train", "shard-000002.tar")
    with open(victim, "r+b") as f:
        f.truncate(1024)
    with pytest.raises(DataError, match=f"{victim} has 1024 bytes but the manifest says"):
        list(source(shard_cfg(make_cfg, root), root))


def test_a_corrupt_image_in_a_local_shard_names_the_shard(sharded, make_cfg):
    root, _, _ = sharded
    victim = os.path.join(root, "train", "shard-000001.tar")
    with open(victim, "r+b") as f:
        f.seek(512 + 30)  # inside the first image, after its tar header; the size stays
        f.write(b"\0" * 30)
    with pytest.raises(DataError, match=f"{victim}: DALI cannot read this shard .*pipeline.tools.validate"):
        list(source(shard_cfg(make_cfg, root, batch_size=4), root))


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_of_one_and_two_digits_in_one_batch(tmp_path, make_cfg, split):
    # The .cls members of a batch differ in length ("7", "11"): DALI pads them to one array the loader parses whole.
    root = str(tmp_path / "wide")
    labels = write_sharded_split(os.path.join(root, "train"), [9, 8], num_classes=12)
    labels |= write_sharded_split(os.path.join(root, "val"), [12], first_id=100, num_classes=12)
    cfg = shard_cfg(make_cfg, root, batch_size=5)
    src = build_source(cfg, split=split, rank=0, world_size=1, device=CPU, seed=1, num_classes=12, root=root)
    got = [(i, label) for x, y in src for i, label in zip(ids(x), y.tolist(), strict=True)]
    assert len(got) == (15 if split == "train" else 12)
    assert all(label == labels[i] for i, label in got) and {label for _, label in got} & {10, 11}


def test_a_label_that_is_no_class_is_named(sharded, make_cfg):
    root, _, _ = sharded
    folder = os.path.join(root, "val")  # evaluation yields every sample: the bad one is not a dropped rest
    manifest = read_manifest(Storage(folder))
    bad = write_shard(
        os.path.join(folder, manifest.shards[0].name), [("000100", _png(100), 0), ("000101", _png(101), 7)]
    )
    write_manifest(Storage(folder), dataclasses.replace(manifest, shards=[bad, *manifest.shards[1:]]))
    with pytest.raises(DataError, match=r"has \.cls b'7', not a class index below 2; check the split with"):
        list(source(shard_cfg(make_cfg, root, batch_size=2), root, split="val"))


@pytest.mark.parametrize(
    "cls, want",
    [
        ([b"7", b"11", b"0"], [7, 11, 0]),  # what shard_format writes, zero-padded by DALI to one array
        ([b" 7\n", b"11"], [7, 11]),  # blanks around the digits: read one sample at a time
        ([b"7", b""], "b''"),
        ([b"7", b"1_0"], "b'1_0'"),  # Python's int() would take it; a class index is digits only
        ([b"-1"], "b'-1'"),
        ([b"12"], "b'12'"),  # not below the 12 classes
        ([b"1" * 19], "b'1111111111111111111"),
    ],
)
def test_cls_bytes_become_labels_or_an_error_naming_them(tmp_path, make_cfg, cls, want):
    from nvidia.dali.tensors import TensorListCPU

    root = str(tmp_path / "twelve")
    write_sharded_split(os.path.join(root, "train"), [12], num_classes=12)
    src = build_source(
        shard_cfg(make_cfg, root), split="train", rank=0, world_size=1, device=CPU, seed=0, num_classes=12, root=root
    )
    width = max(len(c) for c in cls)
    padded = np.array([np.frombuffer(c.ljust(width, b"\0"), dtype=np.uint8) for c in cls])
    if isinstance(want, list):
        assert src._label_tensor(TensorListCPU(padded), None).tolist() == want
    else:
        with pytest.raises(DataError, match=re.escape(f"has .cls {want}")):
            src._label_tensor(TensorListCPU(padded), None)


def test_config_and_layout_errors(sharded, make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data.format = 'shards'.*data.source = 'folder'"):
        DataConfig(format="shards", source="digits")
    with pytest.raises(ConfigError, match="data.cache_bytes"):
        DataConfig(cache_bytes=0)
    root, _, _ = sharded
    with pytest.raises(DataError, match="set --model.num_classes=2"):
        build_source(shard_cfg(make_cfg, root), split="train", rank=0, world_size=1, device=CPU, seed=0, num_classes=5)
    plain = str(tmp_path / "plain")
    os.makedirs(os.path.join(plain, "train"))
    with pytest.raises(DataError, match=r"manifest.json"):
        source(shard_cfg(make_cfg, plain), plain)


# -- s3:// through the node-local cache --------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint behind the 20 ms delay, its moto server) with the AWS variables set for s3fs."""
    import s3fs
    from s3_server import S3_DELAY_S, aws_env, direct_url, start_moto_server

    with start_moto_server(log_dir=tmp_path_factory.mktemp("moto"), delay_s=S3_DELAY_S) as url:
        with environ(aws_env(url)):
            s3fs.S3FileSystem(endpoint_url=direct_url(url), key="testing", secret="testing").mkdir("shards")
            yield url


def upload(tmp_path, name, sizes=TRAIN, val=VAL):
    """A sharded dataset written locally and copied to s3://shards/<name>; returns (root URL, {id: label})."""
    local = str(tmp_path / f"local-{name}")
    train = write_sharded_split(os.path.join(local, "train"), sizes)
    write_sharded_split(os.path.join(local, "val"), val, first_id=200)
    store = Storage(f"s3://shards/{name}")
    for split in ("train", "val"):
        for f in sorted(os.listdir(os.path.join(local, split))):
            store.put(os.path.join(local, split, f), f"{split}/{f}")
    return store.uri, train


def test_s3_shards_read_exactly_once_and_from_the_warm_cache_without_requests(s3, tmp_path, make_cfg):
    from s3_server import count_requests

    root, train = upload(tmp_path, "warm", sizes=[40, 30, 50, 20, 45, 36], val=[3])  # 221 samples
    n = 221
    cfg = shard_cfg(make_cfg, root, batch_size=8, cache_dir=str(tmp_path / "cache"))
    ranks = [source(cfg, root, rank=r, world_size=2, seed=1) for r in range(2)]
    seen = [i for s in ranks for x, _ in s for i in ids(x)]  # cold: the fetcher downloads every shard
    assert len(seen) == len(set(seen)) == 2 * ((n // 2) // 8) * 8 and set(seen) <= set(train)
    cached = sorted(os.listdir(ranks[0]._shard_files.folder))
    assert [f for f in cached if f.endswith(".tar")] == [f"shard-{k:06d}.tar" for k in range(6)]

    with count_requests(s3) as log:  # a restarted job on the same node: the cache is warm
        warm = [source(cfg, root, rank=r, world_size=2, seed=1) for r in range(2)]
        images = 0
        for _ in range(3):
            for s in warm:
                images += sum(len(y) for _, y in s)
        requests = log.requests()
    assert images == 3 * 2 * ((n // 2) // 8) * 8
    assert not [r for r in requests if r.path.endswith(".tar")], requests  # no shard was fetched again
    assert len(requests) / images <= 0.01, requests  # the manifest (HEAD + GET), per rank


def test_a_corrupt_or_missing_s3_shard_is_named(s3, tmp_path, make_cfg):
    root, _ = upload(tmp_path, "corrupt")
    store = Storage(root)
    data = bytearray(store.read_bytes("train/shard-000003.tar"))
    data[700] ^= 0xFF  # same size, other bytes
    store.write_bytes("train/shard-000003.tar", bytes(data))
    store.write_bytes("train/shard-000001.tar", store.read_bytes("train/shard-000001.tar")[:1000])  # truncated
    store.delete("train/shard-000004.tar")
    for victim in ("shard-000003.tar", "shard-000001.tar", "shard-000004.tar"):
        cfg = shard_cfg(make_cfg, root, cache_dir=str(tmp_path / f"cache-{victim}"))
        src = source(cfg, root)
        # Read the victim first, then the rest: the error names the bad shard whatever the epoch's order.
        with pytest.raises(DataError) as e:
            src._shard_files.paths(next(s for s in src.manifest.shards if s.name == victim))
        assert f"{root}/train/{victim}" in str(e.value)
        assert ("missing" if victim.endswith("4.tar") else "corrupt or truncated") in str(e.value)
        with pytest.raises(DataError, match=f"{root}/train/shard-00000[134].tar"):
            list(src)
    partial = src._shard_files._partial_dir
    assert not partial.exists() or not os.listdir(partial)  # nothing half-downloaded is left behind


def test_a_cache_too_small_is_reported(s3, tmp_path, make_cfg):
    root, _ = upload(tmp_path, "small")
    cfg = shard_cfg(make_cfg, root, cache_dir=str(tmp_path / "cache"), cache_bytes=4096)
    with pytest.raises(DataError, match=r"data.cache_bytes = 4096 is smaller than the shard s3://shards/small/train/"):
        list(source(cfg, root))
    shards = source(cfg, root).manifest.shards
    room = 2 * max(s.bytes + 256 * s.samples for s in shards)  # two shards at a time, not the epoch's six
    cfg = shard_cfg(make_cfg, root, cache_dir=str(tmp_path / "cache2"), cache_bytes=room)
    with pytest.raises(DataError, match=r"data.cache_bytes = \d+ cannot hold the shards this node's readers need"):
        list(source(cfg, root))


# -- an epoch read in segments (one pipeline per SEGMENT_SHARDS shards) --------------------------------

MANY = [5] * 40  # 200 samples; at batch 4 a segment is 8 shards = 10 batches (without the samples' floor)


@pytest.fixture
def small_segments(monkeypatch):
    """Segments of SEGMENT_SHARDS shards however few samples they hold: these splits are far below the floor."""
    monkeypatch.setattr(shards_module, "SEGMENT_MIN_SAMPLES", 0)


@pytest.fixture
def many(tmp_path, small_segments):
    root = str(tmp_path / "many")
    return root, write_sharded_split(os.path.join(root, "train"), MANY)


def test_a_segment_holds_8_shards_and_at_least_the_floor_of_samples(tmp_path, make_cfg, monkeypatch):
    root = str(tmp_path / "many")
    write_sharded_split(os.path.join(root, "train"), MANY)
    src = source(shard_cfg(make_cfg, root, batch_size=4), root)
    assert src._segments(0) == [0, 50]  # 200 samples, below the floor: one pipeline reads the epoch
    monkeypatch.setattr(shards_module, "SEGMENT_MIN_SAMPLES", 80)  # 20 batches, more than 8 shards' 10
    assert src._segments(0) == [0, 20, 40, 50]
    monkeypatch.setattr(shards_module, "SEGMENT_MIN_SAMPLES", 0)
    assert src._segments(0) == [0, 10, 20, 30, 40, 50]


@pytest.mark.parametrize("world_size", [1, 3])
def test_segments_read_every_sample_once(many, make_cfg, world_size):
    root, train = many
    cfg = shard_cfg(make_cfg, root, batch_size=4)
    ranks = [source(cfg, root, rank=r, world_size=world_size, seed=2) for r in range(world_size)]
    # 3 ranks: two segments of yielded batches, then the dropped rest's own (1 rank reads no rest: 200 = 50 x 4).
    assert len(ranks[0]._segments(0)) - 1 == (5 if world_size == 1 else 3)
    reader = [record_reader(s) for s in ranks]
    for epoch in range(2):
        produced, seen = Counter(), []
        for r, s in enumerate(ranks):
            start = len(reader[r])
            seen += [i for x, _ in s for i in ids(x)]
            got = [i for b in reader[r][start:] for i in b]
            bounds = s._segments(epoch)
            for seg in range(len(bounds) - 1):  # each segment's pipeline read exactly its samples, shuffled
                lo = bounds[seg] * 4
                want = piece_ids(s, s.segment_pieces(epoch, seg))
                assert sorted(got[lo : lo + len(want)]) == sorted(want)
            produced.update(got[: len(piece_ids(s, s.pieces(epoch)))])
        assert produced == Counter(train.keys())
        assert len(seen) == len(set(seen)) == world_size * len(ranks[0]) * 4


@pytest.mark.parametrize("n_before", [5, 10, 13, 49, 57])  # mid-segment, at a segment start, epoch end, epoch 2
def test_segments_resume_exactly(many, make_cfg, n_before):
    root, _ = many
    cfg = shard_cfg(make_cfg, root, batch_size=4, style="imagenet")
    src = source(cfg, root, seed=4)
    take(src, n_before)
    state = roundtrip(src.state_dict())
    after = take(src, 12)
    resumed = source(cfg, root, seed=4)
    resumed.load_state_dict(state)
    again = take(resumed, 12)
    for (x1, y1), (x2, y2) in zip(after, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def on_disk(folder) -> int:
    """Bytes of complete shards in a cache folder (the fetchers may remove some meanwhile)."""
    total = 0
    for entry in os.scandir(folder):
        if not entry.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
    return total


def test_s3_streams_through_a_cache_smaller_than_the_split(s3, tmp_path, make_cfg, small_segments):
    root, train = upload(tmp_path, "stream", sizes=[5] * 24, val=[3])  # 3 segments of 8 shards
    probe = source(shard_cfg(make_cfg, root, batch_size=4, cache_dir=str(tmp_path / "probe")), root)
    room = 12 * max(s.bytes + 256 * s.samples for s in probe.manifest.shards)  # half the split
    cfg = shard_cfg(make_cfg, root, batch_size=4, cache_dir=str(tmp_path / "cache"), cache_bytes=room)
    src = source(cfg, root, seed=3)
    folder = src._shard_files.folder
    for _ in range(2):
        seen = []
        for x, _ in src:
            seen += ids(x)
            assert on_disk(folder) <= room
        assert sorted(seen) == sorted(train)


def test_a_full_disk_is_reported_with_the_shard_and_the_settings(s3, tmp_path, make_cfg):
    """A real full disk: the cache folder on a 64 KiB tmpfs, mounted in a private mount namespace."""
    import shutil
    import subprocess
    import sys

    from s3_server import aws_env

    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a private tmpfs")
    root, _ = upload(tmp_path, "full", sizes=[90, 10], val=[3])  # shard 0: ~150 KB
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        "from pipeline.data.shard_cache import ShardCache\n"
        "from pipeline.data.shard_format import read_manifest\n"
        "from pipeline.data import DataError\n"
        "from pipeline.core.storage import Storage\n"
        f"store = Storage({root + '/train'!r})\n"
        "manifest = read_manifest(store)\n"
        f"cache = ShardCache(store, manifest, cache_dir={str(mnt)!r}, cache_bytes=1 << 30)\n"
        "try:\n"
        "    cache.paths(manifest.shards[0])\n"
        "except DataError as e:\n"
        "    print('ERROR', e)\n"
    )
    import pipeline

    repo = os.path.dirname(os.path.dirname(pipeline.__file__))
    env = {**os.environ, **aws_env(os.environ["AWS_ENDPOINT_URL"]), "PYTHONPATH": repo}
    cmd = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$1" -c "$2"']
    proc = subprocess.run(
        [*cmd, str(mnt), sys.executable, script], env=env, capture_output=True, text=True, timeout=300
    )
    if "mount" in proc.stderr and "ERROR" not in proc.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    assert f"ERROR the shard cache {mnt}" in proc.stdout, proc.stdout
    assert f"ran out of disk space while fetching {root}/train/shard-000000.tar" in proc.stdout
    assert "--data.cache_bytes" in proc.stdout and "--data.cache_dir" in proc.stdout


def test_the_tracked_dataset_record_names_the_split_and_its_shards(sharded, make_cfg, tmp_path):
    from pipeline.tracking.datasets import describe_split

    root, _, _ = sharded
    cfg = shard_cfg(make_cfg, root)
    record = describe_split(cfg, split="train", source=source(cfg, root))
    assert record.source_type == "local" and record.source == os.path.join(root, "train")
    assert record.num_samples == sum(TRAIN)
    other = str(tmp_path / "other")
    write_sharded_split(os.path.join(other, "train"), [17, 17])
    assert describe_split(cfg, split="train", source=source(shard_cfg(make_cfg, other), other)).digest != record.digest


def test_the_ranks_of_a_node_download_each_shard_once(s3, tmp_path, make_cfg):
    import threading

    from s3_server import count_requests

    root, train = upload(tmp_path, "shared", sizes=[7, 5, 9, 3, 6, 4, 8, 6], val=[3])
    cfg = shard_cfg(make_cfg, root, batch_size=4, cache_dir=str(tmp_path / "node-cache"))
    ranks = [source(cfg, root, rank=r, world_size=2, seed=1) for r in range(2)]
    seen: list[list[int]] = [[], []]
    errors = []

    def read(r):
        try:
            for _ in range(2):  # the second epoch gives each rank other shards, already on the node
                seen[r] += [i for x, _ in ranks[r] for i in ids(x)]
        except Exception as e:  # reported below
            errors.append(e)

    with count_requests(s3) as log:
        threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gets = Counter(r.path for r in log.requests() if r.method == "GET" and r.path.endswith(".tar"))
    assert not errors, errors
    assert sorted(gets) == [f"/shards/shared/train/shard-{k:06d}.tar" for k in range(8)]
    assert set(gets.values()) == {1}, gets  # one download per shard for the whole node
    assert len(seen[0]) == len(seen[1]) == 2 * len(ranks[0]) * 4
