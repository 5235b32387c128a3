"""Entry point: parse, build, train, close.

torchrun --nproc_per_node 8 pipeline/train.py --config configs/imagenet/resnet50.toml --optim.lr=0.2
python -m pipeline.train --help-config      # every key, its default and what it does

--resume auto (the default: this run_id's newest committed checkpoint; a finished run is refused), never (start
this run_id over) or a checkpoint URI. The first log line says which checkpoint and step the run starts from.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `torchrun pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.checkpoint.layout import tag_for
from pipeline.config import TrainConfig, describe, load_config
from pipeline.core.distributed import close_distributed, init_distributed, peer_died
from pipeline.core.errors import UserError, report_error
from pipeline.core.stop import STOP_EXIT_CODE, StopFlag, write_stop_record
from pipeline.runtime.progress import ShortLines, wrap_long_lines
from pipeline.wiring import TrainingRun, build_run

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
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden as --section.key=value.",
    )
    p.add_argument("--config", help="experiment TOML file (see configs/)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument(
        "--resume",
        metavar="auto|never|URI",
        help="short for --checkpoint.resume: auto (default) continues this run_id from its newest committed "
        "checkpoint and refuses a finished run; never starts it over (its checkpoints are set aside); a run or "
        "step folder (local or s3://) starts from that checkpoint",
    )
    args, rest = p.parse_known_args(argv)
    if args.resume is not None:
        rest.append(f"--checkpoint.resume={args.resume}")  # applied last: it wins over a --checkpoint.resume
    return args, rest


def _setup_logging(rank: int) -> None:
    # Only rank 0 talks to the console; other ranks stay quiet unless something is fatal. Every line stays short
    # enough to read in a job's log file (ShortLines wraps longer ones), Python warnings (DALI's, torch's)
    # included, which would otherwise bypass the format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShortLines("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, handlers=[handler], force=True)
    logging.captureWarnings(True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def run(cfg: TrainConfig, *, stop: StopFlag | None = None) -> RunOutcome:
    """Build every component (pipeline.wiring), start, train, and close. Called on every rank."""
    stop = stop or StopFlag().install()
    env = init_distributed(cfg.distributed)
    _setup_logging(env.rank)
    built: TrainingRun | None = None
    try:
        built = build_run(cfg, env=env, stop=stop)
        built.start()
        result = built.trainer.fit()
        built.close()
        # Steps a stop left staged (the store was down) make it a stop too, even after the last step.
        stranded = built.checkpointer.stranded if built.checkpointer is not None else []
        exit_code = STOP_EXIT_CODE if result.stopped or stranded else 0
        if env.is_main:
            if exit_code == STOP_EXIT_CODE and built.checkpointer is not None:
                # close() returned on every rank: the stop's checkpoint is committed, or staged where the next
                # start uploads it (stranded). Either way a restart continues from it: tell the batch script.
                write_stop_record(
                    step=result.step, signal=stop.signal_name, checkpoint=tag_for(result.step), run_id=built.run_id
                )
            if exit_code == STOP_EXIT_CODE:
                log.warning(
                    "stopped by %s at step %d; %s; exit %d so the launcher requeues",
                    stop.signal_name,
                    result.step,
                    f"{', '.join(stranded)} staged, not committed (see above)" if stranded else "checkpoint committed",
                    STOP_EXIT_CODE,
                )
            else:
                built.log_model()
            built.tracker.finish("KILLED" if exit_code == STOP_EXIT_CODE else "FINISHED")
        return RunOutcome(
            exit_code, result.final_val, result.history, str(built.output_dir), built.run_id, built.tracker.run_id
        )
    except BaseException:
        if built is not None and env.is_main:
            built.tracker.finish("FAILED")  # a no-op for a tracker that was never started
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
    except (UserError, ValueError, RuntimeError) as e:
        # A UserError that every rank raises alike is printed once, by rank 0; anything else is a bug (exit 1), or
        # this rank following another's death, which its line says (the launcher reports it as a failure).
        e = peer_died(e) or e
        report_error(e, rank=rank, fmt=wrap_long_lines)
        return e.exit_code if isinstance(e, UserError) else 1
    # The result of a finished run only: a stopped one (exit 75) has at most an intermediate evaluation.
    if rank == 0 and outcome.exit_code == 0 and outcome.final_val:
        v = outcome.final_val
        print(f"{cfg.name}: val top-1 error {v['val_top1_error']:.2f}%  top-5 error {v['val_top5_error']:.2f}%")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
