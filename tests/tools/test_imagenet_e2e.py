"""The README's ImageNet path end to end on tiny archives: prepare -> validate -> train (the real entry
point, DeepSpeed, 2 ranks) with configs/imagenet/resnet18.toml -> evaluate its committed checkpoint;
and a bad image stopping the real entry point with the file's path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datatree import _jpeg, write_ilsvrc_archives

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = "configs/imagenet/resnet18.toml"


def tiny(tree: str, tmp: Path) -> list[str]:
    """Overrides that shrink configs/imagenet/resnet18.toml to the 3-class test tree on the CPU."""
    return [
        f"--data.root={tree}",
        "--model.num_classes=3",
        "--data.image_size=16",
        "--data.val_resize=18",
        "--data.scale=[16, 24]",
        "--data.batch_size=2",
        "--data.num_threads=1",
        "--data.decoder=cpu",
        "--schedule.epochs=1",
        "--schedule.milestones=[]",
        "--precision.dtype=fp32",
        "--log_every=1",
        f"--checkpoint.uri={tmp}/ckpt",
        "--checkpoint.every_minutes=0",
        "--tracking.enabled=false",
        "--progress=false",
        f"--output_dir={tmp}/out",
        "--model.compile=off",
    ]


def run(cmd: list[str], *, nproc: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    prefix = [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone"] if nproc else [sys.executable]
    return subprocess.run(prefix + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    p = write_ilsvrc_archives(str(base / "archives"))["paths"]
    tree = base / "imagenet"
    proc = run(
        [
            "-m",
            "pipeline.tools.prepare",
            "imagenet",
            "--train-tar",
            p["train"],
            "--val-tar",
            p["val"],
            "--devkit",
            p["devkit"],
            "--out",
            str(tree),
            "--mean-samples",
            "50",
            "--no-progress",
            "--verify",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "every file matches manifest.json" in proc.stdout
    return base, tree


@pytest.mark.slow
def test_archives_to_evaluated_checkpoint(prepared, tmp_path):
    base, tree = prepared
    proc = run(["-m", "pipeline.tools.validate", str(tree), "--no-progress"])
    assert proc.returncode == 0 and "0 error(s)" in proc.stdout, proc.stdout + proc.stderr
    train = run(["pipeline/train.py", "--config", CONFIG, *tiny(str(tree), tmp_path)], nproc=2)
    assert train.returncode == 0, train.stderr[-4000:]
    run_folder = tmp_path / "ckpt" / "resnet18"
    assert (run_folder / "latest").read_text().strip().startswith("step-")
    out = tmp_path / "eval.json"
    ev = run(
        [
            "pipeline/evaluate.py",
            "--config",
            CONFIG,
            "--checkpoint",
            str(run_folder),
            "--mode",
            "10crop",
            "--json",
            str(out),
            *tiny(str(tree), tmp_path)[:7],
        ],
        nproc=2,
    )
    assert ev.returncode == 0, ev.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["images"] == 6 and 0 <= result["top1_error"] <= 100 and result["world_size"] == 2


@pytest.mark.slow
def test_a_truncated_image_stops_training_with_its_path(prepared, tmp_path):
    _, tree = prepared
    broken = tmp_path / "imagenet"
    shutil.copytree(tree, broken)
    bad = broken / "train" / "n01443537" / "n01443537_9.JPEG"
    bad.write_bytes(_jpeg(7, (40, 40))[:400])
    proc = run(["pipeline/train.py", "--config", CONFIG, *tiny(str(broken), tmp_path), "--data.batch_size=13"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(bad) in proc.stderr and "pipeline.tools.validate" in proc.stderr
