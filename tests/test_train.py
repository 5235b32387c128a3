"""The training entry point end to end: real DALI pipelines, the real DeepSpeed engine, 2 ranks (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CPU_CONFIG = "configs/cpu/digits_resnet20.toml"
SHORT = ["--schedule.unit=step", "--schedule.milestones=[]", "--schedule.warmup=0", "--progress=false",
         "--tracking.enabled=false"]


def torchrun(args: list[str], *, cwd: Path, timeout: int = 600, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def colour_tree(root: Path, *, per_class: int, classes: int = 2) -> Path:
    """ImageFolder of solid-colour PNGs, one unique colour per image (the centre pixel names it)."""
    k = 0
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                k += 1
                colour = (k * 7 % 256, k * 13 % 256, k // 36 * 40 % 256)
                Image.new("RGB", (32, 32), colour).save(d / f"{i:04d}.png")
    return root


@pytest.mark.slow
def test_two_ranks_see_disjoint_data_and_keep_identical_weights(tmp_path):
    data = colour_tree(tmp_path / "data", per_class=24)
    out = tmp_path / "out"
    out.mkdir()
    r = torchrun([str(ROOT / "tests/helpers/two_rank_worker.py"), str(out), str(ROOT / CPU_CONFIG),
                  "--data.source=folder", f"--data.root={data}", "--data.batch_size=8", "--model.num_classes=2",
                  "--schedule.epochs=2", "--schedule.milestones=[]", "--schedule.warmup=0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"], "DeepSpeed replicas diverged"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6  # 48 images / 2 ranks / batch 8, 2 epochs
    for epoch in range(2):
        a, b = (set(r["seen"][epoch]) for r in ranks)
        assert len(ranks[0]["seen"][epoch]) == len(a) == 24, "a rank saw an image twice in one epoch"
        assert not a & b, f"epoch {epoch}: ranks saw the same images {sorted(a & b)[:3]}"
        assert len(a | b) == 48, "an epoch must cover the whole training split across ranks"
    assert ranks[0]["val"] == ranks[1]["val"]


@pytest.mark.slow
def test_cli_trains_and_evaluates_on_two_ranks(tmp_path):
    r = torchrun([str(ROOT / "pipeline/train.py"), "--config", str(ROOT / CPU_CONFIG), "--schedule.max_steps=6",
                  "--log_every=3", f"--data.cache_dir={ROOT / '.cache/datasets'}", *SHORT,
                  f"--output_dir={tmp_path}/run", f"--checkpoint.uri={tmp_path}/ckpt"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "digits_resnet20: val top-1 error" in r.stdout
    assert r.stdout.count("val top-1 error") == 1, "only rank 0 may print"
    assert (tmp_path / "run" / "config.toml").is_file()


@pytest.mark.slow
def test_diverging_loss_stops_with_a_clear_message(tmp_path):
    r = torchrun([str(ROOT / "pipeline/train.py"), "--config", str(ROOT / CPU_CONFIG), "--schedule.max_steps=8",
                  "--log_every=2", "--optim.lr=1e12", f"--data.cache_dir={ROOT / '.cache/datasets'}", *SHORT,
                  f"--output_dir={tmp_path}/run", f"--checkpoint.uri={tmp_path}/ckpt"], cwd=tmp_path)
    assert r.returncode == 1
    assert "training loss became" in r.stderr and "--optim.lr" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--model.num_classes=7"], "has 10 classes but model.num_classes = 7"),
    (["--data.source=folder", "--data.root=/nonexistent/imagenet"], "/nonexistent/imagenet does not exist"),
    (["--optim.lrr=1"], "unknown config key 'optim.lrr'"),
])
def test_bad_input_fails_before_training(tmp_path, args, needle):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "pipeline/train.py"), "--config", str(ROOT / CPU_CONFIG), *args,
                        f"--data.cache_dir={ROOT / '.cache/datasets'}", *SHORT, f"--output_dir={tmp_path}/run",
                        f"--checkpoint.uri={tmp_path}/ckpt"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("*.pt"))
