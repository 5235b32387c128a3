"""The data path alone, three ways in one run: local files, per-object S3 and sharded S3, at real S3 latency.

Every S3 request goes through a forwarder that holds each chunk ``--delay-ms`` (20 ms) each way in front of a
local ``moto_server`` (tests/s3_server.py: this kernel has no netem), and moto counts the requests it serves.
For each source it builds the training source as training does (``pipeline.data.build_source``, one rank,
CPU decoding) and pulls ``--epochs`` epochs as fast as it delivers (``--step-ms`` adds a simulated step), then
prints one JSON line per source and a table:

* images/s of the rank, over all epochs from its first batch on (epoch boundaries included; the start-up to
  the first batch is reported apart);
* S3 requests per image, counted at the server: over all epochs, and over the epochs after the first (a warm
  node cache for the sharded source);
* the gap at each epoch boundary (last batch of one epoch to the first of the next) against the median
  batch interval inside the epochs.

    python benchmarks/data_throughput.py --images 3000 --epochs 3            # CIFAR-10 JPEGs from ../shared
    python benchmarks/data_throughput.py --jpegs /tmp/bench-jpegs --style imagenet --image-size 224
    python benchmarks/data_throughput.py --images 200 --epochs 2 --batch-size 16 --out rows.jsonl  # smoke size

The sources: ``local`` (data.root = the local tree), ``s3-objects`` (data.root = s3://..., one object per
image, read by DALI's own S3 client) and ``s3-shards`` (the same images written by ``python -m
pipeline.tools.prepare shards`` and read with data.format = "shards" through the node cache). On request
(``--sources local,local-mmap``) also ``local-mmap``: the local tree with DALI mapping the files (its default)
instead of reading them (``pipeline.data.pipelines.READER_IO``), for the cost of that choice in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python benchmarks/data_throughput.py`
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the S3 harness: moto_server, the delaying forwarder, request counts

import torch  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.core.storage import Storage  # noqa: E402
from pipeline.data import build_source, pipelines  # noqa: E402
from pipeline.tools.shard_writer import prepare_shards  # noqa: E402

CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
SOURCES = ("local", "s3-objects", "s3-shards")
EXTRA_SOURCES = ("local-mmap",)  # measured only when --sources names them


@contextlib.contextmanager
def mapped_files(on: bool) -> Iterator[None]:
    """DALI's readers map the local files (``on``) instead of reading them, for pipelines built inside."""
    saved = pipelines.READER_IO
    pipelines.READER_IO = {**saved, "dont_use_mmap": False} if on else saved
    try:
        yield
    finally:
        pipelines.READER_IO = saved


# -- the images ----------------------------------------------------------------------------------------------
def cifar_subset(archive: Path, out: Path, *, images: int) -> int:
    """The first ``images`` training JPEGs of the CIFAR-10 archive, spread evenly over its 10 classes, as
    ``out/train/<class>/``; ``out/val/`` gets one image per class (the loader checks both splits' classes)."""
    per_class = max(1, images // 10)
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 4 or not parts[-1].lower().endswith(".jpg"):
                continue
            split, cls = parts[-3], parts[-2]
            want = per_class if split == "train" else 1 if split == "test" else 0
            if counts.get((split, cls), 0) >= want:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dest = out / ("train" if split == "train" else "val") / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            assert f is not None
            dest.write_bytes(f.read())
    return sum(v for (s, _), v in counts.items() if s == "train")


def jpeg_tree(src: Path, out: Path, *, images: int) -> int:
    """An ImageFolder tree of about ``images`` of ``src/train/<class>/*`` (e.g. benchmarks/make_jpegs.py's),
    the same number from every class, linked not copied, plus a one-image-per-class val split."""
    classes = sorted(p for p in (src / "train").iterdir() if p.is_dir())
    per_class = max(1, -(-images // len(classes)))
    n = 0
    for c in classes:
        files = sorted(f for f in c.iterdir() if f.is_file())[:per_class]
        for split, chosen in (("train", files), ("val", files[:1])):
            (out / split / c.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                os.symlink(f.resolve(), out / split / c.name / f.name)
        n += len(files)
    return n


def upload(local: Path, url: str, *, endpoint_url: str) -> None:
    store = Storage(url, endpoint_url=endpoint_url)
    files = [f"{d}/{n}" if d else n for d, _, names in Storage(str(local)).walk() for n in names]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda rel: store.put(local / rel, rel), files))


# -- one source ------------------------------------------------------------------------------------------------
def measure(
    name: str, cfg: DataConfig, *, epochs: int, step_s: float, log: Any, prefix: str, num_classes: int
) -> dict[str, Any]:
    if log is not None:
        log.reset()
    t0 = time.perf_counter()
    device = torch.device("cuda:0" if cfg.decoder == "mixed" else "cpu")
    source = build_source(cfg, split="train", rank=0, world_size=1, device=device, seed=0, num_classes=num_classes)
    built = time.perf_counter() - t0
    arrivals: list[list[float]] = []
    per_epoch_requests: list[int] = []
    images = 0
    # Time spent asking moto for its request count between epochs (an HTTP round trip of the benchmark's own) is
    # taken off the clock: it is not the loader's, and it would sit right in the epoch gap.
    bookkeeping = 0.0
    for _ in range(epochs):
        times = []
        for x, _y in source:
            if x.is_cuda:
                torch.cuda.synchronize()  # a batch counts when its images exist, not when their work is queued
            times.append(time.perf_counter() - bookkeeping)
            images += x.shape[0]
            if step_s:
                time.sleep(step_s)
        arrivals.append(times)
        if log is not None:
            t = time.perf_counter()
            per_epoch_requests.append(log.count(prefix=prefix))
            bookkeeping += time.perf_counter() - t
    first, last = arrivals[0][0], arrivals[-1][-1]
    intervals = [b - a for times in arrivals for a, b in zip(times, times[1:], strict=False)]
    median = statistics.median(intervals) if intervals else 0.0
    gaps = [arrivals[e + 1][0] - arrivals[e][-1] for e in range(epochs - 1)]
    batches = sum(len(t) for t in arrivals)
    per_epoch_images = images // epochs
    row: dict[str, Any] = {
        "source": name,
        "images": images,
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        # Images after the first batch over the time since it: the rate the rank delivers once running.
        "img_per_s": round((images - images / batches) / (last - first), 1) if last > first else None,
        "first_batch_s": round(arrivals[0][0] - t0, 3),
        "build_s": round(built, 3),
        "median_batch_ms": round(median * 1000, 2) if intervals else None,
        "epoch_gaps_ms": [round(g * 1000, 2) for g in gaps],
        "worst_gap_x_median": round(max(gaps) / median, 2) if gaps and median > 0 else None,
    }
    if log is not None:
        counted = [r for r in log.requests() if r.path.startswith(prefix)]
        by_method: dict[str, int] = {}
        for r in counted:
            by_method[r.method] = by_method.get(r.method, 0) + 1
        row["s3_requests"] = len(counted)
        row["s3_requests_by_method"] = by_method
        row["requests_per_image"] = round(len(counted) / images, 4)
        if epochs > 1:
            after_first = per_epoch_requests[-1] - per_epoch_requests[0]
            row["requests_per_image_after_epoch1"] = round(after_first / (per_epoch_images * (epochs - 1)), 4)
    close = getattr(source, "close", None)
    if close is not None:
        close()
    del source
    return row


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per source from its rounds (run interleaved with the other sources, so that a busy moment of a
    shared machine hits them alike): the median rate and batch interval, every epoch gap; the S3 counts are the
    first round's (the sharded source's cache is cold only then)."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    row = dict(rounds[0])
    if len(rounds) > 1:
        rates = [r["img_per_s"] for r in rounds if r["img_per_s"]]
        medians = [r["median_batch_ms"] for r in rounds if r["median_batch_ms"]]
        row["img_per_s"] = round(statistics.median(rates), 1) if rates else None
        row["img_per_s_rounds"] = [r["img_per_s"] for r in rounds]
        row["median_batch_ms"] = round(statistics.median(medians), 2) if medians else None
        row["epoch_gaps_ms"] = [g for r in rounds for g in r["epoch_gaps_ms"]]
        gaps, median = row["epoch_gaps_ms"], row["median_batch_ms"]
        row["worst_gap_x_median"] = round(max(gaps) / median, 2) if gaps and median else None
        row["rounds"] = len(rounds)
    return row


def _table(rows: list[dict[str, Any]], *, local_rate: float | None) -> str:
    lines = [
        "| source | img/s (rank) | x local | S3 req/img (all epochs) | S3 req/img (after epoch 1) | median batch ms "
        "| epoch gaps ms | worst gap / median | first batch s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | - | - | - | - | - | {r['error'][:80]} | - | - |")
            continue
        x = f"{r['img_per_s'] / local_rate:.2f}" if local_rate and r.get("img_per_s") else "-"
        lines.append(
            f"| {r['source']} | {r['img_per_s']:,.0f} | {x} | {r.get('requests_per_image', '-')} | "
            f"{r.get('requests_per_image_after_epoch1', '-')} | {r['median_batch_ms']} | "
            f"{', '.join(str(g) for g in r['epoch_gaps_ms'])} | {r['worst_gap_x_median']} | {r['first_batch_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000, help="training images (CIFAR-10 JPEGs unless --jpegs)")
    p.add_argument("--jpegs", default="", help="an ImageFolder tree (DIR/train/<class>/*.jpg) to use instead")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads (data.num_threads)")
    p.add_argument(
        "--decoder",
        choices=("cpu", "mixed"),
        default="cpu",
        help="mixed: nvJPEG on the GPU, batches delivered on cuda:0 (where there is one)",
    )
    p.add_argument("--style", choices=("cifar", "imagenet"), default="cifar")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument(
        "--object-images",
        type=int,
        default=600,
        help="per-object S3 reads this many of the images (class-balanced): at ~2 requests of >= 40 ms per image "
        "the whole set would take minutes per epoch; its rate and requests per image do not depend on the count",
    )
    p.add_argument("--delay-ms", type=float, default=20.0, help="held each way on every S3 connection")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step after each batch")
    p.add_argument("--shard-bytes", type=int, default=0, help="default: about 8 shards for the dataset")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times local and s3-shards are measured, interleaved (median reported); s3-objects once",
    )
    p.add_argument("--sources", default=",".join(SOURCES), help=f"any of {', '.join(SOURCES + EXTRA_SOURCES)}")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="", help="append the JSON rows here")
    args = p.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    if unknown := set(sources) - set(SOURCES + EXTRA_SOURCES):
        p.error(f"--sources: unknown {sorted(unknown)}; choose from {', '.join(SOURCES + EXTRA_SOURCES)}")
    torch.set_num_threads(1)

    from s3_server import aws_env, count_requests, direct_url, start_moto_server

    with tempfile.TemporaryDirectory(prefix="data-bench-", dir=args.workdir or None) as scratch:
        work = Path(scratch)
        tree = work / "tree"
        if args.jpegs:
            n = jpeg_tree(Path(args.jpegs), tree, images=args.images)
        elif CIFAR.exists():
            n = cifar_subset(CIFAR, tree, images=args.images)
        else:
            p.error(f"{CIFAR} is absent: give --jpegs DIR (python benchmarks/make_jpegs.py DIR --count N)")
        classes = sorted(d.name for d in (tree / "train").iterdir())
        size = sum(f.stat().st_size for f in (tree / "train").rglob("*") if f.is_file())
        base = DataConfig(
            source="folder",
            style=args.style,
            image_size=args.image_size,
            val_resize=args.image_size,
            scale=[args.image_size, args.image_size * 2],
            batch_size=args.batch_size,
            num_threads=args.threads,
            decoder=args.decoder,
            lighting=0.0,
            cache_dir=str(work / "cache"),
        )
        object_images = 0
        with start_moto_server(log_dir=work, delay_s=args.delay_ms / 1000) as endpoint:
            direct = direct_url(endpoint)
            os.environ.update(aws_env(direct))  # set-up (uploads, sharding) straight to moto, without the delay
            import s3fs

            s3fs.S3FileSystem(endpoint_url=direct, key="testing", secret="testing", skip_instance_cache=True).mkdir(
                "bench"
            )
            if "s3-objects" in sources:
                subset = work / "subset"
                object_images = jpeg_tree(tree, subset, images=min(args.object_images, n))
                upload(subset, "s3://bench/objects", endpoint_url=direct)
            if "s3-shards" in sources:
                shard_bytes = args.shard_bytes or max(64 << 10, size // 8)
                prepare_shards(str(tree), "s3://bench/shards", shard_bytes=shard_bytes, workers=8, progress=False)
            # From here on every S3 client (DALI's own, created at its first read, and s3fs) pays the delay.
            os.environ.update(aws_env(endpoint))
            with count_requests(endpoint) as log:
                per_source: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
                for round_ in range(args.rounds):
                    for name in sources:
                        if name == "s3-objects" and round_ > 0:
                            continue  # minutes per round, and far from the others whatever the load
                        cfg = {
                            "local": lambda: dataclasses.replace(base, root=str(tree)),
                            "local-mmap": lambda: dataclasses.replace(base, root=str(tree)),
                            "s3-objects": lambda: dataclasses.replace(base, root="s3://bench/objects"),
                            "s3-shards": lambda: dataclasses.replace(base, root="s3://bench/shards", format="shards"),
                        }[name]()
                        prefix = {"s3-objects": "/bench/objects/", "s3-shards": "/bench/shards/"}.get(name)
                        try:
                            with mapped_files(name == "local-mmap"):
                                row = measure(
                                    name,
                                    cfg,
                                    epochs=args.epochs,
                                    step_s=args.step_ms / 1000,
                                    log=None if prefix is None else log,
                                    prefix=prefix or "/none/",
                                    num_classes=len(classes),
                                )
                        except Exception as e:  # noqa: BLE001 - a failed source is a row, the others still run
                            row = {"source": name, "error": f"{type(e).__name__}: {e}"}
                        print(json.dumps({"round": round_ + 1, **row}), flush=True)
                        per_source[name].append(row)
                rows = [combine(r) for r in per_source.values()]
    local = next((r.get("img_per_s") for r in rows if r["source"] == "local" and "error" not in r), None)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.decoder} decode"
        + (f", {torch.cuda.get_device_name(0)}" if args.decoder == "mixed" else ""),
        "dataset_images": n,
        "per_object_s3_images": object_images if "s3-objects" in sources else 0,
        "image_bytes": size,
        "delay_ms_each_way": args.delay_ms,
        "versions": _versions(),
        "command": "python benchmarks/data_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(meta))
    print(_table(rows, local_rate=local))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **meta}) + "\n")
    return 1 if any("error" in r for r in rows) else 0


def _versions() -> str:
    out = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod, name in (("nvidia.dali", "DALI"), ("moto", "moto"), ("s3fs", "s3fs")):
        try:
            out.append(f"{name} {__import__(mod, fromlist=['__version__']).__version__}")
        except Exception:  # noqa: BLE001 - a version is information only
            pass
    return ", ".join(out)


if __name__ == "__main__":
    sys.exit(main())
