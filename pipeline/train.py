"""Entry point: parse, build, train, close.

    torchrun --nproc_per_node 8 pipeline/train.py --config configs/imagenet/resnet50.toml --optim.lr=0.2
    python -m pipeline.train --help-config      # every key, its default and what it does
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `torchrun pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from pipeline.config import ConfigError, TrainConfig, describe, flatten, load_config, to_toml
from pipeline.signals import STOP_EXIT_CODE, StopFlag

log = logging.getLogger("pipeline")


@dataclass
class RunOutcome:
    exit_code: int
    final_val: dict[str, float]
    history: list[dict[str, float]]
    output_dir: str
    run_id: str
    tracking_run_id: str | None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config key can be overridden as --section.key=value.")
    p.add_argument("--config", help="experiment TOML file (see configs/)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    return p.parse_known_args(argv)


def _setup_logging(rank: int) -> None:
    # Only rank 0 talks to the console; other ranks stay quiet unless something is fatal.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, *, stop: StopFlag | None = None) -> RunOutcome:
    """Build every component from its own config section, train, and close. Called on every rank."""
    from pipeline.checkpoint import Checkpointer
    from pipeline.data import build_source, prepare_dataset_root
    from pipeline.distributed import broadcast_object, close_distributed, init_distributed
    from pipeline.engine import build_engine
    from pipeline.models import build_model, model_spec
    from pipeline.schedule import LRSchedule, scaled_lr
    from pipeline.tracking import build_tracker
    from pipeline.trainer import Trainer

    stop = stop or StopFlag().install()
    env = init_distributed(cfg.distributed)
    _setup_logging(env.rank)
    _seed_everything(cfg.seed + env.rank)
    out_dir = Path(cfg.resolved_output_dir)
    run_id = cfg.run_id or cfg.name
    tracker = None
    try:
        root = broadcast_object(prepare_dataset_root(cfg.data) if env.is_main else None)
        sources = {split: build_source(cfg.data, split=split, rank=env.rank, world_size=env.world_size,
                                       device=env.device, seed=cfg.seed, num_classes=cfg.model.num_classes,
                                       root=root)
                   for split in ("train", "val")}
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
        global_batch = cfg.data.batch_size * cfg.distributed.grad_accum * env.world_size
        lr = scaled_lr(cfg.optim.lr, reference_batch=cfg.optim.reference_batch, global_batch=global_batch)
        engine = build_engine(model, optim=cfg.optim, precision=cfg.precision, distributed=cfg.distributed,
                              lr=lr, micro_batch=cfg.data.batch_size, world_size=env.world_size,
                              device=env.device, channels_last=cfg.model.channels_last, compile=cfg.model.compile,
                              compile_mode=cfg.model.compile_mode, compile_backend=cfg.model.compile_backend)
        steps_per_epoch = len(sources["train"]) // cfg.distributed.grad_accum
        if steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size = {cfg.data.batch_size} x {env.world_size} ranks x grad_accum "
                              f"{cfg.distributed.grad_accum} is larger than the training split "
                              f"({sources['train'].num_samples} images): lower --data.batch_size")
        schedule = LRSchedule(cfg.schedule, base_lr=lr, steps_per_epoch=steps_per_epoch)
        checkpointer = Checkpointer(cfg.checkpoint, run_id=run_id, rank=env.rank, world_size=env.world_size,
                                    config_hash=cfg.hash(), staging_dir=cfg.checkpoint.staging_dir
                                    or str(out_dir / "staging"))
        checkpointer.check_access()
        trainer = Trainer(engine=engine, train_source=sources["train"], val_source=sources["val"],
                          schedule=schedule, total_steps=schedule.total_steps, rank=env.rank,
                          world_size=env.world_size, device=env.device, log_every=cfg.log_every,
                          eval_every=cfg.eval_every, progress=cfg.progress, checkpointer=checkpointer,
                          stop=stop, seed=cfg.seed)
        state = checkpointer.resume(engine)
        if state is not None:
            trainer.load_state_dict(state)
            if env.is_main:
                log.info("resumed run %s at step %d (epoch %d)", run_id, trainer.step, trainer.epoch)
        tracker = build_tracker(cfg.tracking, is_main=env.is_main, node_id=env.node_rank,
                                is_local_main=env.is_local_main, run_name=cfg.name)
        trainer.tracker = tracker
        # Every rank: rank 0 creates or reopens the MLflow run and broadcasts its id (a collective).
        tracker.start((state or {}).get("tracking_run_id"))
        spec = model_spec(cfg.model.name, **cfg.model.overrides())
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.toml").write_text(to_toml(cfg))
            if state is None:
                tracker.log_params(flatten(cfg))
            tracker.set_tags({**spec.tags(), "model": cfg.model.name,
                              "dataset": cfg.data.source if cfg.data.source != "folder" else cfg.data.style,
                              "world_size": str(env.world_size), **engine.fast_path.as_params()})
            tracker.log_artifact(str(out_dir / "config.toml"))
            log.info("%s: %s, %d ranks on %s, global batch %d, lr %g, %d steps (%d per epoch)", run_id,
                     cfg.model.name, env.world_size, env.device.type, global_batch, lr, schedule.total_steps,
                     steps_per_epoch)
        result = trainer.fit()
        checkpointer.close()
        exit_code = STOP_EXIT_CODE if result.stopped else 0
        if env.is_main:
            if result.stopped:
                log.warning("stopped by %s at step %d; checkpoint committed; exit %d so the launcher requeues",
                            stop.signal_name, result.step, STOP_EXIT_CODE)
            else:
                tracker.log_model(engine.module)
            tracker.finish("KILLED" if result.stopped else "FINISHED")
        return RunOutcome(exit_code, result.final_val, result.history, str(out_dir), run_id,
                          tracker.run_id if tracker else None)
    except BaseException:
        if tracker is not None and env.is_main:
            tracker.finish("FAILED")
        raise
    finally:
        close_distributed()


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, rest)
        outcome = run(cfg)
    except (ConfigError, ValueError, RuntimeError) as e:
        # Every rank validates the same config and fails the same way; one message is enough.
        if rank == 0 or type(e).__name__ not in ("ConfigError", "DataError"):
            print(f"error{'' if rank == 0 else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2 if type(e).__name__ in ("ConfigError", "DataError", "CheckpointError") else 1
    if rank == 0 and outcome.final_val:
        v = outcome.final_val
        print(f"{cfg.name}: val top-1 error {v['val_top1_error']:.2f}%  top-5 error {v['val_top5_error']:.2f}%")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
