"""Write ImageNet-shaped JPEGs for the loader benchmarks: ~95 KiB, 320-640 px sides, in class folders.

    python benchmarks/make_jpegs.py /tmp/bench-jpegs --count 4000          # DIR/train/cNNNN/NNNNNN.jpg

The content is random but compresses like a photograph: smooth noise at several scales (large shapes,
texture), a colour gradient and fine grain, so that the JPEG decoder does the work a real image asks of
it (ImageNet's training JPEGs average ~110 KiB at ~400x350). The grain's strength is adjusted per image
until the file is within 20% of the target size for its area. Deterministic for a given --seed; uses
only numpy and PIL, which come with torchvision, and one process per core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

AVG_AREA = 480 * 480  # mean area of sides uniform in [320, 640]


_GRAIN: np.ndarray | None = None  # per process: fine grain, cut at a random offset for each image
_AMP = [0.5]  # per process: the last grain strength that hit the target, a good first guess for the next


def _grain(seed: int, side: int) -> np.ndarray:
    global _GRAIN
    if _GRAIN is None or _GRAIN.shape[0] < side:
        rng = np.random.default_rng([seed, 2**31])
        mono = rng.normal(0, 40, (2 * side, 2 * side, 1))
        _GRAIN = np.clip(mono + rng.normal(0, 25, (2 * side, 2 * side, 3)), -127, 127).astype(np.int16)
    return _GRAIN


def render(index: int, *, seed: int, min_side: int, max_side: int, target_kib: float, quality: int) -> bytes:
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    # A colour ramp, large shapes (1/32 scale) and smaller ones (1/8 scale) drawn small and enlarged, so
    # smooth like out-of-focus regions; texture at 1/3 scale; then fine grain, whose strength sets the size.
    sh, sw = max(2, h // 8), max(2, w // 8)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / sw + np.sin(angle) * yy / sh)[..., None] * rng.uniform(-0.6, 0.6, size=3)
    blobs = rng.random((max(2, sh // 4), max(2, sw // 4), 3)).astype(np.float32)
    large = np.asarray(Image.fromarray((blobs * 255).astype(np.uint8)).resize((sw, sh), Image.Resampling.BICUBIC))
    coarse = np.clip(0.5 + ramp + 0.7 * (large / 255.0 - 0.5) + 0.25 * (rng.random((sh, sw, 3)) - 0.5), 0, 1)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    tex = rng.integers(0, 256, (max(2, h // 3), max(2, w // 3), 3), dtype=np.uint8)
    tex_img = Image.fromarray(tex).resize((w, h), Image.Resampling.BILINEAR)
    base = np.asarray(Image.blend(img, tex_img, 0.18), dtype=np.int16)
    g = _grain(seed, max_side)
    oy, ox = (int(v) for v in rng.integers(0, g.shape[0] - max_side, size=2))
    grain = g[oy : oy + h, ox : ox + w]
    target = target_kib * 1024 * (h * w) / AVG_AREA
    amp = _AMP[0]
    best = b""
    for _ in range(6):
        pixels = np.clip(base + (grain * amp).astype(np.int16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        if not best or abs(len(data) - target) < abs(len(best) - target):
            best = data
        ratio = len(data) / target
        if 0.9 <= ratio <= 1.1:
            _AMP[0] = amp
            break
        # Size grows a little slower than linearly with the grain's amplitude here.
        amp = float(np.clip(amp / ratio**1.5, 0.0, 4.0))
    return best


def _write(job: tuple[int, str, dict]) -> int:
    index, path, kw = job
    data = render(index, **kw)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="dataset root; images go to OUT/train/<class>/")
    p.add_argument("--count", type=int, default=4000)
    p.add_argument("--classes", type=int, default=1000, help="class folders (1000: ImageNet's classifier size)")
    p.add_argument("--min-side", type=int, default=320)
    p.add_argument("--max-side", type=int, default=640)
    p.add_argument("--target-kib", type=float, default=95.0, help="mean file size")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    out = Path(args.out)
    marker = out / ".complete.json"
    want = {k: getattr(args, k) for k in ("count", "classes", "min_side", "max_side", "target_kib", "quality", "seed")}
    if marker.is_file() and json.loads(marker.read_text()).get("args") == want:
        print(f"{out}: already written ({args.count} images)")
        return 0
    classes = min(args.classes, args.count)
    kw = dict(
        seed=args.seed, min_side=args.min_side, max_side=args.max_side, target_kib=args.target_kib, quality=args.quality
    )
    jobs = []
    for i in range(args.count):
        folder = out / "train" / f"c{i % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((i, str(folder / f"{i:06d}.jpg"), kw))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        sizes = list(pool.map(_write, jobs, chunksize=16))
    dt = time.perf_counter() - t0
    summary = {
        "args": want,
        "images": len(sizes),
        "mean_kib": sum(sizes) / len(sizes) / 1024,
        "total_mib": sum(sizes) / 2**20,
        "seconds": dt,
    }
    marker.write_text(json.dumps(summary))
    print(
        f"{out}: {len(sizes)} JPEGs in {classes} class folders, mean {summary['mean_kib']:.1f} KiB, "
        f"{summary['total_mib']:.0f} MiB, {dt:.1f} s with {args.workers} processes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
