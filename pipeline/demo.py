"""`make demo`: plain-20 versus ResNet-20 on real handwritten digits, on whatever this machine has.

No data is needed: scikit-learn's bundled digits are written as 32x32 JPEGs in the ImageFolder layout
and go through the full path (DALI, DeepSpeed, checkpoints). ``--data DIR`` uses any ImageFolder
dataset instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.train import run

CONFIGS = ("configs/cpu/digits_plain20.toml", "configs/cpu/digits_resnet20.toml")
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", help="an ImageFolder dataset (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg)")
    p.add_argument("--num-classes", type=int, help="class count of --data (default: counted from DIR/train)")
    args, rest = p.parse_known_args(argv)
    overrides = list(rest)
    if args.data:
        n = args.num_classes or sum(1 for d in Path(args.data, "train").iterdir() if d.is_dir())
        overrides += ["--data.source=folder", f"--data.root={args.data}", f"--model.num_classes={n}"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for path in CONFIGS:
        cfg = load_config(ROOT / path, [f"--run_id={Path(path).stem}-{stamp}", *overrides])
        print(f"== {cfg.model.name}: training on {'digits' if not args.data else args.data}", flush=True)
        outcome = run(cfg)
        if outcome.exit_code:
            return outcome.exit_code
        results[cfg.model.name] = outcome.final_val["val_top1_error"]
    print("\nvalidation top-1 error")
    for name, err in results.items():
        print(f"  {name:<16} {err:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
