"""The training entry point end to end: real DALI pipelines, the real DeepSpeed engine, 2 ranks (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.runtime.metrics import is_timing
from pipeline.runtime.progress import unwrap_lines

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CPU_CONFIG = "configs/cpu/digits_resnet20.toml"
SHORT = [
    "--schedule.unit=step",
    "--schedule.milestones=[]",
    "--schedule.warmup=0",
    "--progress=false",
    "--tracking.enabled=false",
]


def torchrun(
    args: list[str], *, cwd: Path, timeout: int = 600, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return _joined(
        subprocess.run(
            [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    )


def _joined(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run with its long log lines joined back (the log format wraps lines over 300 characters), so a test
    reads a message whole."""
    r.stderr = unwrap_lines(r.stderr or "")
    return r


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
    r = torchrun(
        [
            str(ROOT / "tests/helpers/two_rank_worker.py"),
            str(out),
            str(ROOT / CPU_CONFIG),
            "--data.source=folder",
            f"--data.root={data}",
            "--data.batch_size=8",
            "--model.num_classes=2",
            "--schedule.epochs=2",
            "--schedule.milestones=[]",
            "--schedule.warmup=0",
        ],
        cwd=tmp_path,
    )
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
    r = torchrun(
        [
            str(ROOT / "pipeline/train.py"),
            "--config",
            str(ROOT / CPU_CONFIG),
            "--schedule.max_steps=6",
            "--log_every=3",
            f"--data.cache_dir={ROOT / '.cache/datasets'}",
            *SHORT,
            f"--output_dir={tmp_path}/run",
            f"--checkpoint.uri={tmp_path}/ckpt",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "digits_resnet20: val top-1 error" in r.stdout
    assert r.stdout.count("val top-1 error") == 1, "only rank 0 may print"
    assert (tmp_path / "run" / "config.toml").is_file()


@pytest.mark.slow
def test_diverging_loss_stops_with_a_clear_message(tmp_path):
    r = torchrun(
        [
            str(ROOT / "pipeline/train.py"),
            "--config",
            str(ROOT / CPU_CONFIG),
            "--schedule.max_steps=8",
            "--log_every=2",
            "--optim.lr=1e12",
            f"--data.cache_dir={ROOT / '.cache/datasets'}",
            *SHORT,
            f"--output_dir={tmp_path}/run",
            f"--checkpoint.uri={tmp_path}/ckpt",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert "training loss became" in r.stderr and "--optim.lr" in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model.num_classes=7"], "has 10 classes but model.num_classes = 7"),
        (["--data.source=folder", "--data.root=/nonexistent/imagenet"], "/nonexistent/imagenet does not exist"),
        (["--optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--optim.lr=nan"], "optim.lr = nan: must be a finite number"),  # issue 15: refused at start-up
        (["--config", str(ROOT / "configs")], f"config file '{ROOT / 'configs'}' is a directory"),
        (["--data.source=folder", f"--data.root={ROOT / 'README.md'}"], "README.md is a file, expected a folder"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, args, needle):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipeline/train.py"),
            "--config",
            str(ROOT / CPU_CONFIG),
            *args,
            f"--data.cache_dir={ROOT / '.cache/datasets'}",
            *SHORT,
            f"--output_dir={tmp_path}/run",
            f"--checkpoint.uri={tmp_path}/ckpt",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("*.pt"))


def train_cli(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess:
    """One process, no torchrun."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    return _joined(
        subprocess.run(
            [sys.executable, str(ROOT / "pipeline/train.py"), "--config", str(ROOT / CPU_CONFIG), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )


@pytest.mark.slow
def test_resume_from_a_save_at_an_epoch_end_continues_like_the_uninterrupted_run(tmp_path):
    """The save lands on an epoch's last step: the resumed run neither skips nor repeats that epoch's evaluation
    (the plateau schedule's state depends on it), and its history and weights are the uninterrupted run's."""
    import torch

    # log_every=1: a log row averages the steps since the previous log, and a resumed run has only its own.
    common = [
        "--data.in_memory=true",
        "--data.batch_size=128",
        "--log_every=1",
        "--schedule.kind=plateau",
        "--schedule.plateau_patience=1",
        "--schedule.max_steps=14",
        "--checkpoint.every_steps=1",
        "--checkpoint.keep_last=20",
        f"--checkpoint.uri={tmp_path}/ckpt",
        f"--data.cache_dir={ROOT / '.cache/datasets'}",
        *SHORT,
    ]
    r = train_cli([*common, "--run_id=a", f"--output_dir={tmp_path}/a"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    def saved(run: str, step: int) -> tuple[list[dict], dict]:
        d = tmp_path / "ckpt" / run / f"step-{step}"
        history = torch.load(d / "trainer-rank0.pt", weights_only=False)["history"]
        module = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return [{k: v for k, v in row.items() if not is_timing(k)} for row in history], module

    history, weights = saved("a", 14)
    epoch_end = next(row["step"] for row in history if "val_top1_error" in row)
    assert 1 < epoch_end < 14 and [row["epoch"] for row in history if "val_top1_error" in row] == [1.0, 1.0]
    r = train_cli(
        [
            *common,
            "--run_id=b",
            f"--output_dir={tmp_path}/b",
            f"--checkpoint.resume={tmp_path}/ckpt/a/step-{epoch_end}",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed run b at step {epoch_end} (epoch 1)" in r.stderr
    resumed_history, resumed_weights = saved("b", 14)
    assert resumed_history == history
    assert resumed_weights.keys() == weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


@pytest.mark.parametrize("value", ["never", "auto", "s3://bucket/ckpt/run/step-40", "/shared/ckpt/run"])
def test_resume_is_short_for_checkpoint_resume(value):
    from pipeline.config import load_config
    from pipeline.train import parse_args

    for argv in (["--resume", value], [f"--resume={value}"], ["--checkpoint.resume=auto", "--resume", value]):
        args, rest = parse_args(["--config", CPU_CONFIG, *argv, "--optim.lr=0.2"])
        cfg = load_config(ROOT / args.config, rest)
        assert cfg.checkpoint.resume == value and cfg.optim.lr == 0.2
    _, rest = parse_args(["--config", CPU_CONFIG])
    assert load_config(ROOT / CPU_CONFIG, rest).checkpoint.resume == "auto"  # the default: what requeues rely on
