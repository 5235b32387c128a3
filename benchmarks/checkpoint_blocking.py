"""How long does a checkpoint hold up training, as the checkpoint grows?

For each size, a one-rank DeepSpeed engine (SGD with momentum, so the checkpoint is about 2x the
weights) is saved three times through ``pipeline.checkpoint.Checkpointer``:

  blocked   time the training loop spends inside ``save`` (DeepSpeed's local write + queueing)
  committed time from the start of ``save`` until the manifest and ``latest`` are written
            (what a synchronous save would block for)

Backends: a local folder, and an S3 server (moto_server on 127.0.0.1, reached through s3fs exactly
like AWS). Results are appended to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/checkpoint_blocking.py [--sizes-mib 8,32,128,256] [--backends local,s3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipeline.checkpoint import Checkpointer  # noqa: E402
from pipeline.config import CheckpointConfig  # noqa: E402
from pipeline.core.distributed import read_env  # noqa: E402
from pipeline.core.storage import Storage  # noqa: E402


def _engine(size_mib: int):  # type: ignore[no-untyped-def]
    import deepspeed
    import torch
    from torch import nn

    n = int((size_mib * 2**20 / 2 / 4) ** 0.5)  # weights + momentum ~= size_mib
    model = nn.Linear(n, n, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_micro_batch_size_per_gpu": 1,
            "train_batch_size": 1,
            "steps_per_print": 2**31 - 1,
            "zero_optimization": {"stage": 0},
        },
    )
    x = torch.randn(1, n)
    engine.backward(engine(x).sum())
    engine.step()  # momentum buffers exist, as in training
    return engine


def _measure(uri: str, size_mib: int, staging: Path, repeats: int) -> dict[str, float]:
    engine = _engine(size_mib)
    ck = Checkpointer(
        CheckpointConfig(uri=uri, keep_last=1),
        run_id=f"bench-{size_mib}",
        rank=0,
        world_size=1,
        config_hash="bench",
        staging_dir=str(staging),
    )
    ck.check_access()
    blocked, committed = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        ck.save(engine, step=i + 1, epoch=0, trainer_state={"step": i + 1})
        blocked.append(time.perf_counter() - t0)
        ck.wait()
        committed.append(time.perf_counter() - t0)
    ck.close()

    store = Storage(uri).child(f"bench-{size_mib}")
    actual = sum(size for f, size in store.find(f"step-{repeats}").items() if f.endswith(".pt"))
    return {
        "size_mib": actual / 2**20,
        "blocked_s": statistics.median(blocked),
        "committed_s": statistics.median(committed),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="8,32,128,256")
    p.add_argument("--backends", default="local,s3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)

    read_env()  # a world of one: DeepSpeed still wants a process group
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            if backend == "s3":
                import s3fs
                from s3_server import aws_env, start_moto_server

                server = start_moto_server()
                endpoint = server.__enter__()
                os.environ.update(aws_env(endpoint))
                s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("bench")
                uri = "s3://bench/ckpt"
            else:
                uri = str(Path(tmp) / "ckpt")
            try:
                for size in sizes:
                    r = _measure(uri, size, Path(tmp) / f"staging-{backend}-{size}", args.repeats)
                    rows.append((backend, r))
                    print(
                        f"{backend:5s} {r['size_mib']:8.1f} MiB  blocked {r['blocked_s']:.3f} s  "
                        f"committed {r['committed_s']:.3f} s",
                        flush=True,
                    )
            finally:
                if backend == "s3":
                    server.__exit__(None, None, None)
    load = os.getloadavg()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    lines = [
        f"\n## Checkpoint blocking time vs size ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {cpu}, {os.cpu_count()} cores, load average {load[0]:.1f} at the end (shared machine), no GPU",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}",
        f"- command: `.venv/bin/python benchmarks/checkpoint_blocking.py --sizes-mib {args.sizes_mib} "
        f"--backends {args.backends} --repeats {args.repeats}`",
        "- blocked = time the training loop spends in `Checkpointer.save` (median of the repeats); committed = "
        "from the start of `save` until manifest and `latest` are written, i.e. what a synchronous save would block",
        "",
        "| backend | checkpoint MiB | blocked s | committed s | blocked / committed |",
        "|---|---:|---:|---:|---:|",
    ]
    for backend, r in rows:
        lines.append(
            f"| {backend} | {r['size_mib']:.1f} | {r['blocked_s']:.3f} | {r['committed_s']:.3f} | "
            f"{r['blocked_s'] / max(r['committed_s'], 1e-9):.0%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        out = ROOT / "benchmarks" / "RESULTS.md"
        if not out.exists():
            out.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n")
        with open(out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
