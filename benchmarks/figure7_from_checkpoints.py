"""Figure 7's measurement again, on the checkpoints a study left: every member measured the same way, now.

A study records the std of its 3x3 layers' responses while it trains (``diagnostics.response_std``). When the
measurement itself changed during a study, or a study ran without it, this measures it afterwards on each
member's newest committed checkpoint, with the training code's own pieces: the member's config
(``pipeline.study.runner.member_config``), its weights (``pipeline.evaluate.load_model_state``, verified against
the manifest), the class-stratified measurement batch (``pipeline.data.measurement_batch``) and
``pipeline.runtime.diagnostics.response_std``. It prints, per member, the mean std over its 3x3 layers (all
elements, and per channel then averaged), and writes every layer's values as JSON::

    python benchmarks/figure7_from_checkpoints.py configs/study/cifar10_early_cpu.toml \\
        --checkpoints runs/checkpoints --out runs/figure7.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/figure7_from_checkpoints.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data import measurement_batch
from pipeline.evaluate import load_model_state
from pipeline.models import build_model
from pipeline.runtime.diagnostics import response_std
from pipeline.study.runner import member_config, read_study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="the study file its members trained from")
    p.add_argument("--checkpoints", required=True, help="checkpoint.uri the members used (their run folders inside)")
    p.add_argument("--out", help="write every layer's stds here as JSON")
    args, overrides = p.parse_known_args(argv)
    torch.set_num_threads(1)
    study = read_study(args.study)
    rows, out = [], {}
    for m in study.members:
        cfg = member_config(study, m, overrides=overrides)
        state, folder = load_model_state(f"{args.checkpoints.rstrip('/')}/{cfg.resolved_run_id}")
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
        model.load_state_dict(state, strict=True)
        images, _ = measurement_batch(cfg.data, device=torch.device("cpu"), num_classes=cfg.model.num_classes)
        stats = response_std(model, list(images.split(100)))
        out[m.name] = {"checkpoint": folder, "layers": stats.layers, "per_channel": stats.per_channel}
        mean = sum(stats.layers.values()) / len(stats.layers)
        per_channel = sum(stats.per_channel.values()) / len(stats.per_channel)
        rows.append((m.name, folder.rsplit("/", 1)[-1], len(stats.layers), mean, per_channel))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{'member':<10} {'checkpoint':<10} {'layers':>6} {'std (all)':>9} {'std (per ch.)':>13}")
    for name, tag, n, mean, per_channel in rows:
        print(f"{name:<10} {tag:<10} {n:>6} {mean:>9.3f} {per_channel:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
