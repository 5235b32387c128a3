"""Run under torchrun by tests/test_train.py: the real Trainer on 2 ranks, recording what each rank saw.

Writes <out>/rank<R>.json with the identity of every training image this rank received (per epoch) and
a digest of its final weights, so the test can check disjoint shards and identical replicas. The test's
images are solid colours, unique per image, so the centre pixel survives the random crop and names it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.distributed import close_distributed, init_distributed  # noqa: E402
from pipeline.data import prepare_dataset_root  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.runtime.engine import build_engine  # noqa: E402
from pipeline.runtime.schedule import LRSchedule  # noqa: E402
from pipeline.trainer import LoopSettings, Trainer, TrainerParts  # noqa: E402
from pipeline.wiring import split_source  # noqa: E402


class Recording:
    """Wraps a data source; remembers a hash of every image it hands out."""

    def __init__(self, source, seen: list[list[str]], mean: list[float], std: list[float]) -> None:
        self.source, self.seen, self.mean, self.std = source, seen, mean, std

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __iter__(self):
        self.seen.append([])
        mean = torch.tensor(self.mean).view(3)
        std = torch.tensor(self.std).view(3)
        for images, labels in self.source:
            centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2].cpu() * std + mean
            self.seen[-1] += [",".join(str(int(round(v))) for v in px.tolist()) for px in centre]
            yield images, labels


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(sys.argv[2], sys.argv[3:])
    env = init_distributed(cfg.distributed)
    torch.manual_seed(cfg.seed)  # identical initial weights; DeepSpeed also broadcasts rank 0's
    root = prepare_dataset_root(cfg.data)
    seen: list[list[str]] = []
    train = Recording(split_source(cfg, env, "train", root=root), seen, cfg.data.mean, cfg.data.std)
    val = split_source(cfg, env, "val", root=root)
    model = build_model(cfg.model.name, num_classes=cfg.model.num_classes)
    engine = build_engine(
        model,
        optim=cfg.optim,
        precision=cfg.precision,
        distributed=cfg.distributed,
        lr=0.05,
        micro_batch=cfg.data.batch_size,
        world_size=env.world_size,
        device=env.device,
    )
    schedule = LRSchedule(cfg.schedule, base_lr=0.05, steps_per_epoch=len(train))
    trainer = Trainer(
        TrainerParts(engine=engine, train_source=train, val_source=val, schedule=schedule),
        loop=LoopSettings(total_steps=schedule.total_steps, log_every=2, progress=False),
        env=env,
    )
    result = trainer.fit()
    digest = hashlib.sha256()
    for t in engine.module.state_dict().values():
        digest.update(t.detach().cpu().numpy().tobytes())
    (out / f"rank{env.rank}.json").write_text(
        json.dumps(
            {
                "seen": seen,
                "weights": digest.hexdigest(),
                "val": result.final_val,
                "steps": result.step,
                "rank": env.rank,
                "world_size": env.world_size,
            }
        )
    )
    close_distributed()


if __name__ == "__main__":
    main()
