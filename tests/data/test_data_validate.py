"""python -m pipeline.tools.validate, data.exclude_list, and what training does with a bad image.

DALI 2.4's CPU decoder, inside a training pipeline, was checked directly: a truncated JPEG raises
"Failed to decode sample #k : <path>", and a zero-byte file or bytes that are no image at all
"nvImageCodec failure: '#4'" without a path (read with mmap, DALI's default, which the readers here turn off, a
zero-byte file said "File mapping failed: <path>"). The loader turns each of these into a DataError that names the
file; these tests prove the path is in the message.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch
from datatree import _jpeg
from PIL import Image

from pipeline.data import DataError, build_source
from pipeline.data.sniff import quick_scan
from pipeline.tools.validate import main, validate_tree

CPU = torch.device("cpu")


def _noisy_jpeg(seed=0, size=(48, 40)) -> bytes:
    return _jpeg(seed, size)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _mode_jpeg(mode: str) -> bytes:
    buf = io.BytesIO()
    channels = {"CMYK": 4, "L": 1}[mode]
    arr = np.random.default_rng(0).integers(0, 255, (16, 16, channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode).save(buf, format="JPEG")
    return buf.getvalue()


BAD = {  # name -> (bytes, kind)
    "truncated": (_noisy_jpeg(1)[:500], "corrupt"),
    "empty": (b"", "empty"),
    "garbage": (b"this is not an image" * 20, "not-an-image"),
    "png": (_png_bytes(), "wrong-format"),
    "cmyk": (_mode_jpeg("CMYK"), "cmyk"),
    "gray": (_mode_jpeg("L"), "grayscale"),
}


def make_tree(tree, bad: list[str], split="train"):
    """A 2-class tree of valid JPEGs plus the named bad files in class 'a' of ``split``."""
    root, _ = tree({"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 2}}, ext=".JPEG", size=(20, 20))
    rel = []
    for name in bad:
        data, _ = BAD[name]
        path = os.path.join(root, split, "a", f"{name}.JPEG")
        with open(path, "wb") as f:
            f.write(data)
        rel.append(f"{split}/a/{name}.JPEG")
    return root, rel


def test_validate_finds_every_kind(tree, capsys):
    root, rel = make_tree(tree, list(BAD))
    problems, total = validate_tree(root, workers=2, progress=False)
    assert total == 14 + len(BAD)
    found = {p.path: p.kind for p in problems}
    assert found == {f"train/a/{name}.JPEG": kind for name, (_, kind) in BAD.items()}
    by_name = {p.path.split("/")[-1]: p for p in problems}
    assert "PNG data named .jpeg" in by_name["png.JPEG"].detail
    assert [p.is_error for p in problems] == [p.kind in ("corrupt", "empty", "not-an-image") for p in problems]

    assert main([root, "--no-progress", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    for name in BAD:
        assert os.path.join(root, "train", "a", f"{name}.JPEG") in out  # each reported with its path
    assert "3 error(s), 3 warning(s)" in out


def test_clean_tree_passes(tree, capsys):
    root, _ = make_tree(tree, [])
    assert main([root, "--no-progress"]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_missing_root(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- training on a tree with a bad image ---------------------------------------------------------


def epoch(cfg, root, split="train"):
    src = build_source(cfg, split=split, rank=0, world_size=1, device=CPU, seed=0, num_classes=2, root=root)
    return sum(len(y) for _, y in src), src


@pytest.mark.parametrize("bad", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_training_stops_with_the_file_in_the_error(tree, make_cfg, bad, split):
    root, rel = make_tree(tree, [bad], split=split)
    with pytest.raises(DataError) as e:
        epoch(make_cfg(style="imagenet"), root, split)
    msg = str(e.value)
    assert os.path.join(root, rel[0]) in msg, msg
    assert "pipeline.tools.validate" in msg and "--data.exclude_list" in msg


def test_exclude_list_skips_and_converted_copies_are_read(tree, make_cfg, tmp_path, capsys):
    root, rel = make_tree(tree, list(BAD))
    listing = str(tmp_path / "bad.txt")
    fixed = str(tmp_path / "fixed")
    assert main([root, "--no-progress", "--write-list", listing, "--convert-to", fixed]) == 1
    text = open(listing).read()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert sorted(lines[:0] + [ln.split("\t")[0] for ln in lines]) == sorted(rel)
    assert "train/a/truncated.JPEG" in lines and f"train/a/png.JPEG\t{fixed}/train/a/png.JPEG" in lines
    with Image.open(f"{fixed}/train/a/cmyk.JPEG") as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")

    cfg = make_cfg(style="imagenet", exclude_list=listing, batch_size=1)
    seen, src = epoch(cfg, root)
    assert seen == src.num_samples == 10 + 3  # 3 errors skipped, 3 warnings read from their converted copies
    assert sum(f.startswith(fixed) for f in src.index.files) == 3

    strict = str(tmp_path / "strict.txt")
    assert main([root, "--no-progress", "--write-list", strict, "--strict"]) == 1
    seen, _ = epoch(make_cfg(style="imagenet", exclude_list=strict, batch_size=1), root)
    assert seen == 10


def test_exclude_list_errors(tree, make_cfg, tmp_path):
    root, _ = make_tree(tree, [])
    with pytest.raises(DataError, match=r"data.exclude_list = .*nope.txt' does not exist"):
        epoch(make_cfg(exclude_list=str(tmp_path / "nope.txt")), root)
    other = tmp_path / "other.txt"
    other.write_text("# from another tree\ntrain/a/zzz.JPEG\n")
    with pytest.raises(DataError, match=r"names 1 image\(s\) that are not in .*train/a/zzz.JPEG.*written for another"):
        epoch(make_cfg(exclude_list=str(other)), root)
    absolute = tmp_path / "abs.txt"
    absolute.write_text(f"{root}/train/a/000.JPEG\n")
    with pytest.raises(DataError, match=r"line 1: .* is not a path relative to the dataset root"):
        epoch(make_cfg(exclude_list=str(absolute)), root)
    everything = tmp_path / "all.txt"
    everything.write_text("".join(f"train/a/{k:03d}.JPEG\n" for k in range(5)))
    with pytest.raises(DataError, match=r"contain no images.*take them out of the exclude list"):
        epoch(make_cfg(exclude_list=str(everything)), root)
    # a list relative to the root is found there
    (tmp_path / "ds" / "rel.txt").write_text("train/a/000.JPEG\n")
    seen, _ = epoch(make_cfg(exclude_list="rel.txt", batch_size=1), root)
    assert seen == 9


def test_quick_scan(tree):
    root, rel = make_tree(tree, list(BAD))
    files = [os.path.join(root, r) for r in rel] + [os.path.join(root, "train", "b", "000.JPEG")]
    found = dict(quick_scan(files))
    assert set(found) == {os.path.join(root, f"train/a/{n}.JPEG") for n in ("truncated", "empty", "garbage")}
    assert "empty" in found[os.path.join(root, "train/a/empty.JPEG")]
    assert "truncated" in found[os.path.join(root, "train/a/truncated.JPEG")]


# -- a file cut short under a running job -------------------------------------------------------------------------
CUT_SHORT = """
import os, sys
import torch
sys.path.insert(0, {here!r})
from datatree import write_sharded_split, write_tree
from pipeline.config import DataConfig
from pipeline.data import DataError, build_source

root, fmt = sys.argv[1], sys.argv[2]
if fmt == "files":
    files = sorted(write_tree(root, {{"train": {{"a": 24, "b": 24}}, "val": {{"a": 1, "b": 1}}}}, ext=".jpg",
                              size=(96, 96)))
else:
    write_sharded_split(os.path.join(root, "train"), [16, 16, 16])
    files = sorted(os.path.join(root, "train", f) for f in os.listdir(os.path.join(root, "train")) if f.endswith(".tar"))
cfg = DataConfig(source="folder", root=root, format=fmt, batch_size=4, image_size=16, val_resize=18, num_threads=1,
                 prefetch=2, decoder="cpu", scale=[16, 24], lighting=0.0)
src = build_source(cfg, split="train", rank=0, world_size=1, device=torch.device("cpu"), seed=0, num_classes=2,
                   root=root)
batches = iter(src)
next(batches)
for path in files:  # what a copy or `prepare` writing in place does first: the file is empty for a moment
    os.truncate(path, 0)
try:
    for _ in range(3):
        for _ in batches:
            pass
        batches = iter(src)
except DataError as e:
    print("DataError:", e)
    sys.exit(3)
print("read on without an error")
"""


@pytest.mark.parametrize("fmt", ["files", "shards"])
def test_a_file_cut_short_while_a_job_reads_it_is_named_not_a_bus_error(tmp_path, fmt):
    # Run apart: were DALI to map the files (its default), this is a SIGBUS in its threads that would end pytest too.
    import subprocess
    import sys

    root = str(tmp_path / "ds")
    script = CUT_SHORT.format(here=os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", script, root, fmt], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]  # not -7 (SIGBUS): the job stops with the error below
    assert "DataError:" in out and root in out, out[-3000:]
    if fmt == "shards":  # DALI names the shard's index (shorter tar than it says): the error names the shard
        assert re.search(rf"DataError: {re.escape(root)}/train/shard-\d+\.tar: DALI cannot read this shard", out), out
