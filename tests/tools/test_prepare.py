"""python -m pipeline.tools.prepare: official-format archives (built here, tiny) -> ImageFolder tree,
locally and on a real S3 server; resume, manifest, --verify, and every bad input a user can bring."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from datatree import WNIDS, _add, _jpeg, write_ilsvrc_archives, write_meta_mat

from pipeline.core.storage import Storage, sha256_file
from pipeline.data import DataError, shard_format
from pipeline.tools import imagenet_tree
from pipeline.tools.imagenet_tree import DATASET_MANIFEST as MANIFEST
from pipeline.tools.imagenet_tree import prepare_imagenet, verify_tree
from pipeline.tools.mean_image import MEAN_IMAGE
from pipeline.tools.prepare import main
from pipeline.tools.shard_writer import prepare_shards


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return write_ilsvrc_archives(str(tmp_path_factory.mktemp("archives")))


def run_prepare(out, archives, *, labels="devkit", **kw):
    p = archives["paths"]
    kw.setdefault("mean_samples", 100)
    return prepare_imagenet(
        out,
        train_tar=p["train"],
        val_tar=p["val"],
        workers=2,
        image_size=16,
        resize=18,
        progress=False,
        **{"devkit" if labels == "devkit" else "val_labels": p[labels]},
        **kw,
    )


def tree_contents(root):
    out = {}
    for split in ("train", "val"):
        for cls in sorted(os.listdir(os.path.join(root, split))):
            for name in sorted(os.listdir(os.path.join(root, split, cls))):
                with open(os.path.join(root, split, cls, name), "rb") as f:
                    out.setdefault(split, {}).setdefault(cls, {})[name] = f.read()
    return out


@pytest.mark.parametrize("labels", ["devkit", "csv"])
def test_prepare_writes_the_imagefolder_tree(tmp_path, archives, labels):
    out = str(tmp_path / "imagenet")
    manifest = run_prepare(out, archives, labels=labels)
    assert tree_contents(out) == archives["expected"]  # every image, byte for byte, in its class folder
    assert sorted(os.listdir(out)) == [".manifest", MANIFEST, MEAN_IMAGE, "train", "val"]  # no staging left
    train = manifest["splits"]["train"]
    assert train["files"] == 12 and sorted(train["classes"]) == list(WNIDS)
    assert {c["files"] for c in train["classes"].values()} == {4}
    assert manifest["splits"]["val"]["files"] == 6
    assert json.loads(open(os.path.join(out, MANIFEST)).read())["splits"] == manifest["splits"]
    mean = np.load(os.path.join(out, MEAN_IMAGE))
    assert mean.shape == (16, 16, 3) and mean.dtype == np.float32 and 80 < mean.mean() < 160
    assert verify_tree(out, progress=False) == []


def test_resume_skips_finished_classes(tmp_path, archives, monkeypatch):
    out = str(tmp_path / "imagenet")
    real_write = imagenet_tree._PreparedTree.write
    writes = []

    def failing(self, split, cls, name, data):
        if split == "train" and cls == WNIDS[1] and name.endswith("_3.JPEG"):
            raise OSError("simulated crash")
        writes.append((split, cls))
        return real_write(self, split, cls, name, data)

    monkeypatch.setattr(imagenet_tree._PreparedTree, "write", failing)
    with pytest.raises(OSError, match="simulated crash"):
        run_prepare(out, archives)
    assert os.listdir(os.path.join(out, "train")) == [WNIDS[0]]  # only the finished class is visible
    assert not os.path.exists(os.path.join(out, MANIFEST))

    writes.clear()
    monkeypatch.setattr(
        imagenet_tree._PreparedTree, "write", lambda self, *a: (writes.append(a[:2]), real_write(self, *a))
    )
    run_prepare(out, archives)
    assert ("train", WNIDS[0]) not in writes and ("train", WNIDS[1]) in writes  # the finished class is not redone
    assert tree_contents(out) == archives["expected"]
    assert verify_tree(out, progress=False) == []

    writes.clear()
    run_prepare(out, archives)  # everything complete: nothing is written again
    assert writes == []


def test_interrupted_validation_keeps_written_images(tmp_path, archives, monkeypatch):
    out = str(tmp_path / "imagenet")
    real_write = imagenet_tree._PreparedTree.write
    count = {"val": 0}

    def failing(self, split, cls, name, data):
        if split == "val":
            count["val"] += 1
            if count["val"] == 4:
                raise OSError("simulated crash")
        return real_write(self, split, cls, name, data)

    monkeypatch.setattr(imagenet_tree._PreparedTree, "write", failing)
    with pytest.raises(OSError):
        run_prepare(out, archives)
    assert not os.path.exists(os.path.join(out, "val"))  # nothing half-done is visible
    count["val"] = 100
    run_prepare(out, archives)
    assert count["val"] < 100 + 6  # images already staged were not written again
    assert tree_contents(out) == archives["expected"]


def test_verify_names_every_damaged_file(tmp_path, archives):
    out = str(tmp_path / "imagenet")
    run_prepare(out, archives, mean_samples=0)
    cls = os.path.join(out, "train", WNIDS[0])
    names = sorted(os.listdir(cls))
    with open(os.path.join(cls, names[0]), "r+b") as f:  # same size, different bytes
        f.seek(100)
        f.write(b"\x00\x01\x02")
    os.remove(os.path.join(cls, names[1]))
    with open(os.path.join(cls, names[2]), "ab") as f:
        f.write(b"x")
    open(os.path.join(cls, "stray.JPEG"), "wb").write(_jpeg(5, (8, 8)))
    problems = verify_tree(out, progress=False)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert f"{names[0]}: sha256 differs" in text
    assert f"{names[1]}: missing" in text
    assert f"{names[2]}: " in text and "bytes, the manifest says" in text
    assert "stray.JPEG: not in the manifest" in text
    assert main(["imagenet", "--out", out, "--verify", "--no-progress"]) == 1


def test_verify_without_manifest_says_to_resume(tmp_path, capsys):
    (tmp_path / "t" / "train").mkdir(parents=True)
    assert main(["imagenet", "--out", str(tmp_path / "t"), "--verify", "--no-progress"]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


# -- bad inputs ----------------------------------------------------------------------------------


def _tar(path, members: dict[str, bytes], mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return str(path)


def _prepare_err(out, capsys, *args):
    code = main(["imagenet", "--out", str(out), "--no-progress", "--mean-samples", "0", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_missing_archive(tmp_path, capsys):
    err = _prepare_err(tmp_path / "o", capsys, "--train-tar", str(tmp_path / "nope.tar"))
    assert f"{tmp_path / 'nope.tar'} does not exist" in err


def test_train_archive_of_images_instead_of_class_tars(tmp_path, capsys):
    bad = _tar(tmp_path / "train.tar", {"n01440764_1.JPEG": _jpeg(0, (8, 8))})
    err = _prepare_err(tmp_path / "o", capsys, "--train-tar", bad)
    assert "holds 'n01440764_1.JPEG'" in err and "one tar per class named nXXXXXXXX.tar" in err


def test_truncated_train_archive_keeps_finished_classes(tmp_path, archives, capsys):
    data = open(archives["paths"]["train"], "rb").read()
    cut = tmp_path / "ILSVRC2012_img_train.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "o"
    err = _prepare_err(out, capsys, "--train-tar", str(cut))
    assert f"{cut} is damaged or ends early" in err and "run the same command again" in err
    assert len(os.listdir(out / "train")) >= 1  # the classes before the damage are kept


def test_val_labels_are_required_and_exclusive(tmp_path, archives, capsys):
    p = archives["paths"]
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", p["val"])
    assert "--val-tar needs the validation labels" in err
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", p["val"], "--devkit", p["devkit"], "--val-labels", p["csv"])
    assert "not both" in err


def test_devkit_without_meta(tmp_path, archives, capsys):
    devkit = _tar(tmp_path / "devkit.tar.gz", {"d/data/ILSVRC2012_validation_ground_truth.txt": b"1\n"}, "w:gz")
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", archives["paths"]["val"], "--devkit", devkit)
    assert "has no data/meta.mat" in err and "ILSVRC2012_devkit_t12.tar.gz" in err


def test_ground_truth_with_an_unknown_class_id(tmp_path, archives, capsys):
    meta = tmp_path / "meta.mat"
    write_meta_mat(str(meta), WNIDS)
    devkit = _tar(
        tmp_path / "devkit.tar.gz",
        {"d/data/meta.mat": meta.read_bytes(), "d/data/ILSVRC2012_validation_ground_truth.txt": b"1\n2\n9\n"},
        "w:gz",
    )
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", archives["paths"]["val"], "--devkit", devkit)
    assert "line 3: '9' is not an ILSVRC2012_ID" in err


def test_meta_mat_without_synsets(tmp_path, archives, capsys):
    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(buf, {"other": np.zeros(3)})
    devkit = _tar(
        tmp_path / "devkit.tar.gz",
        {"d/data/meta.mat": buf.getvalue(), "d/data/ILSVRC2012_validation_ground_truth.txt": b"1\n"},
        "w:gz",
    )
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", archives["paths"]["val"], "--devkit", devkit)
    assert "no 'synsets' struct array" in err and "['other']" in err


def test_csv_missing_an_image_and_bad_header(tmp_path, archives, capsys):
    lines = open(archives["paths"]["csv"]).read().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:-1]) + "\n")  # the last image has no label
    out = tmp_path / "o"
    err = _prepare_err(out, capsys, "--val-tar", archives["paths"]["val"], "--val-labels", str(short))
    assert "ILSVRC2012_val_00000006.JPEG, which the validation labels do not list" in err
    assert not (out / "val").exists()
    header = tmp_path / "header.csv"
    header.write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    err = _prepare_err(out, capsys, "--val-tar", archives["paths"]["val"], "--val-labels", str(header))
    assert "expected 'ImageId,PredictionString'" in err


def test_val_archive_with_a_stranger(tmp_path, archives, capsys):
    val = _tar(tmp_path / "val.tar", {"ILSVRC2012_val_00000001.JPEG": _jpeg(1, (8, 8)), "notes.txt": b"hi"})
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", val, "--val-labels", archives["paths"]["csv"])
    assert "holds 'notes.txt'" in err


def test_val_archive_shorter_than_the_labels(tmp_path, archives, capsys):
    val = _tar(tmp_path / "val.tar", {"ILSVRC2012_val_00000001.JPEG": _jpeg(1, (8, 8))})
    err = _prepare_err(tmp_path / "o", capsys, "--val-tar", val, "--val-labels", archives["paths"]["csv"])
    assert "holds 1 images but the validation labels list 6" in err


def test_train_and_val_classes_must_agree(tmp_path, archives, capsys):
    # A train archive with only two of the three classes: the tree could not be trained on.
    train = tmp_path / "train.tar"
    with tarfile.open(train, "w") as outer:
        for w in WNIDS[:2]:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                _add(inner, f"{w}_1.JPEG", _jpeg(1, (8, 8)))
            _add(outer, f"{w}.tar", buf.getvalue())
    err = _prepare_err(
        tmp_path / "o",
        capsys,
        "--train-tar",
        str(train),
        "--val-tar",
        archives["paths"]["val"],
        "--devkit",
        archives["paths"]["devkit"],
    )
    assert "the training and validation classes differ" in err and f"only in val: {WNIDS[2]}" in err


def test_nothing_to_do():
    with pytest.raises(DataError, match="nothing to prepare"):
        prepare_imagenet("/tmp/never-written")


def test_unwritable_output(tmp_path, archives, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _prepare_err(blocker / "imagenet", capsys, "--train-tar", archives["paths"]["train"])
    assert str(blocker / "imagenet") in err


# -- object storage ------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_from_and_to_s3(tmp_path, archives, s3_bucket, s3_endpoint, monkeypatch):
    from s3_server import aws_env

    for k, v in aws_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    src = Storage(f"{s3_bucket}/archives")
    for path in archives["paths"].values():
        src.put(path, os.path.basename(path))
    p = {k: src.url(os.path.basename(v)) for k, v in archives["paths"].items()}
    out = f"{s3_bucket}/imagenet"
    real_write = imagenet_tree._PreparedTree.write
    calls = []

    def crash_on_third_class(self, split, cls, name, data):
        if cls == WNIDS[2] and split == "train":
            raise OSError("simulated crash")
        calls.append(cls)
        return real_write(self, split, cls, name, data)

    monkeypatch.setattr(imagenet_tree._PreparedTree, "write", crash_on_third_class)
    args = dict(train_tar=p["train"], val_tar=p["val"], devkit=p["devkit"], workers=4, mean_samples=50)
    with pytest.raises(OSError):
        prepare_imagenet(out, **args, image_size=16, resize=18, progress=False)
    monkeypatch.setattr(imagenet_tree._PreparedTree, "write", real_write)
    manifest = prepare_imagenet(out, **args, image_size=16, resize=18, progress=False)
    assert manifest["splits"]["train"]["files"] == 12 and manifest["splits"]["val"]["files"] == 6
    store = Storage(out)
    listing = store.find()
    for split, classes in archives["expected"].items():
        for cls, files in classes.items():
            for name, data in files.items():
                assert store.read_bytes(f"{split}/{cls}/{name}") == data
    assert MANIFEST in listing and MEAN_IMAGE in listing
    assert verify_tree(out, progress=False) == []
    store.write_bytes(f"val/{WNIDS[0]}/ILSVRC2012_val_00000002.JPEG", b"corrupted")
    assert any("ILSVRC2012_val_00000002.JPEG" in p for p in verify_tree(out, progress=False))


# -- sharded splits ------------------------------------------------------------------------------------------
SHARD_LAYOUT = {"train": {"a": 9, "b": 8, "c": 7}, "val": {"a": 2, "b": 2, "c": 2}}
SMALL_SHARDS = 10240  # a 16x16 sample takes 2 KiB of tar (4 blocks): 4 samples and the end in one 10 KiB record


def read_with_dali(tars: list[str]) -> list[tuple[int, int]]:
    """(image id, label) of every sample of ``tars`` through DALI's own readers.webdataset and CPU decoder, with
    the index files beside them."""
    from datatree import MEAN  # noqa: F401 - the tree's colours: red = image id
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[: -len(".tar")] + ".idx" for t in tars],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    total = p.reader_meta("reader")["epoch_size"]
    out: list[tuple[int, int]] = []
    while len(out) < total:
        images, labels = p.run()
        for k in range(len(images)):
            img = np.asarray(images.at(k))
            out.append((int(img[img.shape[0] // 2, img.shape[1] // 2, 0]), int(bytes(np.asarray(labels.at(k))))))
    return out[:total]


def _expected(index: dict[str, int], split: str) -> dict[int, int]:
    """{image id: label} of a split of a write_tree tree (labels: sorted class names)."""
    classes = sorted(SHARD_LAYOUT[split])
    return {i: classes.index(os.path.basename(os.path.dirname(p))) for p, i in index.items() if f"/{split}/" in p}


@pytest.fixture
def shard_tree(tmp_path):
    from datatree import write_tree

    root = str(tmp_path / "tree")
    return root, write_tree(root, SHARD_LAYOUT)


def test_shards_hold_every_image_once_readable_by_dali(tmp_path, shard_tree):

    root, index = shard_tree
    out = str(tmp_path / "shards")
    written = prepare_shards(root, out, shard_bytes=SMALL_SHARDS, workers=2, progress=False)
    assert sorted(written) == ["train", "val"]
    for split in ("train", "val"):
        manifest = shard_format.read_manifest(Storage(f"{out}/{split}"))
        assert manifest == written[split]
        assert manifest.classes == ["a", "b", "c"] and manifest.num_classes == 3
        assert manifest.num_samples == sum(SHARD_LAYOUT[split].values())
        assert [s.samples for s in manifest.shards][:-1] == [4] * (len(manifest.shards) - 1)
        names = sorted(os.listdir(f"{out}/{split}"))
        assert names == sorted(["manifest.json", *(n for s in manifest.shards for n in (s.name, s.index))])
        for s in manifest.shards:
            tar = f"{out}/{split}/{s.name}"
            assert (s.bytes, s.sha256) == (os.path.getsize(tar), sha256_file(tar).sha256) and s.bytes <= SMALL_SHARDS
            assert s.index_sha256 == sha256_file(f"{out}/{split}/{s.index}").sha256
            with tarfile.open(tar) as t:
                members = t.getnames()
            assert len(members) == 2 * s.samples and [m.rsplit(".", 1)[1] for m in members[:2]] == ["jpg", "cls"]
        got = read_with_dali([f"{out}/{split}/{s.name}" for s in manifest.shards])
        assert sorted(got) == sorted(_expected(index, split).items())  # every image once, with its label
    train = read_with_dali([f"{out}/train/{s.name}" for s in written["train"].shards])
    labels = [label for _, label in train]
    assert labels != sorted(labels), "the samples were not shuffled before being cut into shards"
    assert any(len({lb for _, lb in train[k : k + 4]}) > 1 for k in range(0, len(train), 4)), "no class-mixed shard"
    # The same tree and seed give the same bytes; another seed another order.
    again = prepare_shards(root, str(tmp_path / "again"), shard_bytes=SMALL_SHARDS, workers=1, progress=False)
    assert again == written
    other = prepare_shards(root, str(tmp_path / "other"), shard_bytes=SMALL_SHARDS, seed=1, progress=False)
    assert [s.sha256 for s in other["train"].shards] != [s.sha256 for s in written["train"].shards]


def test_shards_command_and_rewrite(tmp_path, shard_tree, capsys):

    root, _ = shard_tree
    out = str(tmp_path / "shards")
    assert main(["shards", root, out, "--shard-bytes", str(SMALL_SHARDS), "--splits", "train", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "24 samples of 3 classes in 6 shards" in printed and "--data.format=shards" in printed
    assert sorted(os.listdir(out)) == ["train"]
    # Bigger shards over the same folder: the old, now surplus shards go, the manifest is the new one.
    assert main(["shards", root, out, "--splits", "train", "--no-progress"]) == 0
    manifest = shard_format.read_manifest(Storage(f"{out}/train"))
    assert len(manifest.shards) == 1 and sorted(os.listdir(f"{out}/train")) == [
        "manifest.json",
        "shard-000000.idx",
        "shard-000000.tar",
    ]
    assert main(["shards", str(tmp_path / "nothing"), out, "--no-progress"]) == 2
    assert "holds no split folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["imagenet", "--out", root, "--format", "shards"])
    assert "--format shards needs --shards-out" in capsys.readouterr().err


def test_imagenet_format_shards(tmp_path, archives):

    tree, shards = str(tmp_path / "imagenet"), str(tmp_path / "imagenet-shards")
    p = archives["paths"]
    args = ["--train-tar", p["train"], "--val-tar", p["val"], "--devkit", p["devkit"], "--mean-samples", "0"]
    assert main(["imagenet", "--out", tree, *args, "--format", "shards", "--shards-out", shards, "--no-progress"]) == 0
    train = shard_format.read_manifest(Storage(f"{shards}/train"))
    val = shard_format.read_manifest(Storage(f"{shards}/val"))
    assert (train.num_samples, val.num_samples) == (12, 6) and train.classes == list(WNIDS) == val.classes


@pytest.mark.slow
def test_shards_to_and_from_s3(tmp_path, shard_tree, s3_bucket, s3_endpoint, monkeypatch):
    from s3_server import aws_env

    for k, v in aws_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    root, _ = shard_tree
    local = prepare_shards(root, str(tmp_path / "local"), shard_bytes=SMALL_SHARDS, progress=False)
    src = Storage(f"{s3_bucket}/tree")
    for folder, _, names in Storage(root).walk():
        for n in names:
            src.put(os.path.join(root, folder, n), f"{folder}/{n}")
    out = f"{s3_bucket}/shards"
    remote = prepare_shards(src.uri, out, shard_bytes=SMALL_SHARDS, workers=4, progress=False)
    assert remote == local  # from S3 to S3: the same shards, byte for byte (sha256), as locally
    store = Storage(out)
    for split, manifest in remote.items():
        assert shard_format.read_manifest(store.child(split)) == manifest
        for s in manifest.shards:
            assert store.read_bytes(f"{split}/{s.name}") == open(f"{tmp_path}/local/{split}/{s.name}", "rb").read()
            assert store.read_bytes(f"{split}/{s.index}") == open(f"{tmp_path}/local/{split}/{s.index}", "rb").read()
