"""Overrides that shrink a CPU config (configs/cpu/*) to a run of seconds, for the end-to-end tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--data.batch_size=32",
    "--schedule.max_steps=10",
    "--schedule.unit=step",
    "--schedule.milestones=[]",
    "--schedule.warmup=0",
    "--log_every=2",
    "--progress=false",
]


def digits_study(tmp_path: Path, uri: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run configs/study/digits_depth.toml (plain-20, ResNet-20) at TINY size,
    logging to ``uri``, with checkpoints and outputs under ``tmp_path``; ``extra`` overrides go last."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.study",
        str(REPO / "configs/study/digits_depth.toml"),
        *TINY,
        f"--data.cache_dir={REPO / '.cache/datasets'}",
        f"--checkpoint.uri={tmp_path / 'ckpt'}",
        f"--output_dir={tmp_path / 'runs/{name}'}",
        f"--tracking.uri={uri}",
        "--tracking.flush_interval_s=0.5",
        *extra,
    ]
    return cmd, {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""}
