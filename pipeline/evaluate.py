"""Evaluate a trained checkpoint on the validation split: top-1 and top-5 error under the paper's tests.

    python -m pipeline.evaluate --config configs/imagenet/resnet50.toml \\
        --checkpoint s3://bucket/checkpoints/<run_id> --mode 10crop
    torchrun --nproc_per_node 8 -m pipeline.evaluate --config configs/imagenet/resnet152.toml \\
        --checkpoint /shared/ckpt/<run_id>/step-600000 --mode multiscale --data.root=/datasets/imagenet

Modes (section 3.4 and Table 3/4 of the paper):

* ``center``: shorter side resized to ``data.val_resize`` (256), the centre ``data.image_size`` crop.
* ``10crop``: the four corner crops and the centre crop of that image, and their mirror images;
  the ten softmax score vectors are averaged.
* ``multiscale``: the whole image, fully convolutional (global average pooling before the classifier),
  with its shorter side at each of ``--scales`` (224, 256, 384, 480, 640); the scores are averaged.
  Images of the same size within a batch are run together, the others one by one.

``--checkpoint`` is a run folder (its ``latest`` committed checkpoint is used), a step folder, or any
folder holding DeepSpeed's ``mp_rank_00_model_states.pt``; only the model weights (``module``) are
read, on every rank. The validation images are sharded by global rank, each scored exactly once, and
the per-rank sums are all-reduced; the total is checked against the size of the split.

The result goes to the MLflow run that trained the checkpoint (its id is in the trainer state saved beside the
weights), at ``tracking.uri``, from rank 0, as ``eval_<mode>_top1_error``, ``eval_<mode>_top5_error`` and
``eval_<mode>_loss`` at the checkpoint's step: the depth-study report then shows it, marked "10-crop", in place
of the centre-crop validation logged while training. ``--tracking.enabled=false`` or ``--no-log`` skip it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `torchrun pipeline/evaluate.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from tqdm.auto import tqdm

from pipeline.checkpoint.layout import (
    LATEST,
    MANIFEST,
    CheckpointError,
    check_model,
    committed_candidates,
    config_changes,
    first_good,
    read_manifest,
    step_of,
    storage_options,
    verified_file,
)
from pipeline.config import ConfigError, flatten, load_config
from pipeline.core.distributed import broadcast_object, close_distributed, init_distributed
from pipeline.core.errors import UserError, report_error
from pipeline.core.storage import Storage, StorageError
from pipeline.data import DataSource, prepare_dataset_root
from pipeline.models import build_model
from pipeline.runtime.metrics import MetricSums
from pipeline.runtime.progress import is_terminal
from pipeline.tracking import resolve_uri
from pipeline.wiring import model_record, size_cpu_threads, split_source

MODEL_FILE = "mp_rank_00_model_states.pt"
TRAINER_STATE = "trainer-rank0.pt"  # the trainer's state, saved by rank 0 beside the weights: the tracking run id
MODES = ("center", "10crop", "multiscale")

log = logging.getLogger("pipeline.evaluate")


class EvaluationError(UserError, RuntimeError):
    """A checkpoint or evaluation problem; the message names the URI or file and the fix."""


# --------------------------------------------------------------------------------------------------
# Checkpoint


def resolve_checkpoint(
    uri: str, local: str | Path | None = None, *, storage: dict[str, str] | None = None
) -> tuple[str, dict[str, Any] | None]:
    """The folder whose model file is used, and its checkpoint manifest (None for a bare DeepSpeed folder).

    A run folder yields its newest committed checkpoint whose model file matches the manifest (size and
    sha256), falling back to older committed ones with a warning, as ``Checkpointer.resume`` does; step
    folders without a manifest are never taken from a run folder. The model file is downloaded to
    ``local`` (to a temporary file, then deleted, when None). ``storage``: Storage options
    (``checkpoint.storage_options(cfg.checkpoint)``)."""
    if local is None:
        with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
            return resolve_checkpoint(uri, Path(tmp) / MODEL_FILE, storage=storage)
    opts = storage or {}
    try:
        store = Storage(uri, **opts)
        if store.exists(MODEL_FILE):  # a step folder, or DeepSpeed's files alone
            if not store.exists(MANIFEST):
                if step_of(store.uri.rsplit("/", 1)[-1]) is not None:
                    log.warning(
                        "%s has no %s (not committed, or set aside): its %s is used unverified",
                        store.uri,
                        MANIFEST,
                        MODEL_FILE,
                    )
                try:
                    store.get(MODEL_FILE, local)
                except StorageError as e:
                    raise EvaluationError(f"cannot download {store.url(MODEL_FILE)}: {e}") from e
                return store.uri, None
            parent, tag = store.uri.rsplit("/", 1) if "/" in store.uri else (".", store.uri)
            parent_store = Storage(parent, **opts)
            manifest = read_manifest(parent_store, tag)
            if manifest is None:
                raise EvaluationError(f"--checkpoint {uri}: its {MANIFEST} disappeared while reading it; retry")
            try:
                _verified_model(parent_store, tag, manifest, local)
            except CheckpointError as e:
                raise EvaluationError(
                    f"{store.url(MODEL_FILE)} does not match its manifest ({e}): the checkpoint "
                    f"is damaged; use an older one"
                ) from e
            return store.uri, manifest
        try:
            candidates = committed_candidates(store)
        except CheckpointError as e:  # `latest` exists, nothing is committed
            raise EvaluationError(
                f"--checkpoint {uri}: {e}; restore the checkpoint, or give a step folder "
                f"(<checkpoint.uri>/<run_id>/step-<N>) to evaluate it unverified"
            ) from e
        if not candidates:
            raise EvaluationError(
                f"--checkpoint {uri}: no committed checkpoint found (no {MODEL_FILE}, no {LATEST}, "
                f"no step-*/{MANIFEST}); give a run folder (<checkpoint.uri>/<run_id>) or a step "
                f"folder"
            )
        chosen, rejected = first_good(store, candidates, lambda tag, m: _verified_model(store, tag, m, local))
        if chosen is None:
            raise EvaluationError(
                f"--checkpoint {uri}: the {MODEL_FILE} of every committed checkpoint is missing or "
                f"does not match its manifest ({'; '.join(f'{t}: {e}' for t, e in rejected)}); the "
                f"checkpoints are damaged: restore them, or give a step folder of another copy"
            )
        if rejected:
            # The result belongs to an older step than the run's newest: say which, and why, next to the result.
            log.warning(
                "evaluating %s (step %s), not the newest committed checkpoint: %s",
                store.url(chosen[0]),
                chosen[1].get("step", step_of(chosen[0])),
                "; ".join(f"{t} failed verification ({e})" for t, e in rejected),
            )
        return store.url(chosen[0]), chosen[1]
    except (StorageError, CheckpointError) as e:
        raise EvaluationError(f"--checkpoint {uri}: {e}") from e


def _verified_model(store: Storage, tag: str, manifest: dict[str, Any], local: str | Path) -> None:
    """Download ``tag``'s model file to ``local``, checked against ``manifest``; CheckpointError if it fails."""
    entry = next((f for f in manifest.get("files", []) if f.get("path") == MODEL_FILE), None)
    if entry is None:
        raise CheckpointError(f"the manifest {store.url(f'{tag}/{MANIFEST}')} does not list {MODEL_FILE}")
    verified_file(store, f"{tag}/{MODEL_FILE}", local, entry)


def load_model_state(
    uri: str, *, storage: dict[str, str] | None = None, check: Callable[[str, dict[str, Any]], None] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The model weights of the checkpoint at ``uri`` (verified against its manifest when it has one),
    and the folder they came from. ``storage``: Storage options, as for ``resolve_checkpoint``. ``check``:
    called with the folder and its manifest (when it has one) before the weights are read; it raises to refuse."""
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        local = Path(tmp) / MODEL_FILE
        folder, manifest = resolve_checkpoint(uri, local, storage=storage)
        if check is not None and manifest is not None:
            check(folder, manifest)
        # DeepSpeed's file also holds its config and versions (plain Python objects); the weights are
        # all this reads from it.
        state = torch.load(local, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "module" not in state:
        raise EvaluationError(f"{folder}/{MODEL_FILE} has no 'module' entry: it is not a DeepSpeed model-states file")
    return _strip_prefixes(state["module"]), folder


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torch.compile's wrapper and DDP-style wrappers prefix every key (wrapped twice: twice); the plain
    # model has none.
    out = dict(sd)  # stripped in place: leave the caller's dict alone
    for prefix in ("_orig_mod.", "module."):
        while any(k.startswith(prefix) for k in out):
            consume_prefix_in_state_dict_if_present(out, prefix)
    return out


# --------------------------------------------------------------------------------------------------
# Scoring


def _scores(model: torch.nn.Module, images: Any, mode: str) -> torch.Tensor:
    """Averaged class probabilities, (N, classes), for one batch of the val source."""
    if mode == "center":
        return model(images).float().softmax(dim=1)
    if mode == "10crop":
        n, views = images.shape[:2]
        probs = model(images.flatten(0, 1)).float().softmax(dim=1)
        return probs.view(n, views, -1).mean(dim=1)
    # multiscale: images[s][i] is image i at scale s, (3, H, W); same-size images run together.
    n = len(images[0])
    total: torch.Tensor | None = None
    for per_scale in images:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(per_scale):
            groups.setdefault(tuple(img.shape), []).append(i)
        for idx in groups.values():
            probs = model(torch.stack([per_scale[i] for i in idx])).float().softmax(dim=1)
            if total is None:
                total = torch.zeros(n, probs.shape[1], dtype=torch.float32, device=probs.device)
            total[idx] += probs
    assert total is not None
    return total / len(images)


@torch.no_grad()
def evaluate_source(
    model: torch.nn.Module,
    source: DataSource,
    *,
    mode: str,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 error (%) and the loss of the averaged scores over the whole split: every rank runs
    its shard, then the sums are all-reduced (a collective when a process group exists)."""
    model.eval()
    sums = MetricSums(device)
    bar = None
    if progress:
        bar = tqdm(total=len(source), unit="batch", desc=f"evaluate {mode}", dynamic_ncols=True)
    for images, labels in source:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            probs = _scores(model, images, mode)
        sums.update_scores(probs, labels)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = sums.reduce()
    if result["count"] != source.num_samples:
        raise EvaluationError(
            f"evaluation scored {result['count']} images but the validation split has "
            f"{source.num_samples}: the sharding is broken"
        )
    return {
        "top1_error": result["top1_error"],
        "top5_error": result["top5_error"],
        "loss": result["loss"],
        "images": result["count"],
    }


# --------------------------------------------------------------------------------------------------
# The result, to the run that trained the checkpoint


def checkpoint_run(folder: str, *, storage: dict[str, str] | None = None) -> tuple[str | None, int | None]:
    """The MLflow run id that trained the checkpoint in ``folder`` and the checkpoint's step, from the trainer
    state saved beside its weights; (None, None) for a folder without one (DeepSpeed's files alone). A committed
    checkpoint's trainer state is checked against its manifest, as its weights were."""
    try:
        store = Storage(folder, **(storage or {}))
        if not store.exists(TRAINER_STATE):
            return None, None
        parent, tag = Storage.of_file(store.uri, **(storage or {}))
        manifest = read_manifest(parent, tag)
        entry = next((f for f in (manifest or {}).get("files", []) if f.get("path") == TRAINER_STATE), None)
        with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
            local = Path(tmp) / TRAINER_STATE
            if entry is not None:
                verified_file(parent, f"{tag}/{TRAINER_STATE}", local, entry)
            else:  # no manifest: read unverified, as its weights were
                store.get(TRAINER_STATE, local)
            state = torch.load(local, map_location="cpu", weights_only=False)
    except (StorageError, CheckpointError) as e:
        raise EvaluationError(f"cannot read {folder}/{TRAINER_STATE} (the tracking run id): {e}") from e
    if not isinstance(state, dict):
        return None, None
    return state.get("tracking_run_id") or None, state.get("step")


def log_result(result: dict[str, Any], *, tracking_uri: str, run_id: str, step: int) -> None:
    """Add the evaluation to the run ``run_id``: ``eval_<mode>_{top1_error,top5_error,loss}`` at ``step`` and
    the checkpoint it scored as the tag ``eval_<mode>_checkpoint``. Rank 0 only."""
    # mlflow is heavy (seconds to import) and only this rank-0 logging path needs it
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    mode = result["mode"]
    now = int(time.time() * 1000)
    metrics = [Metric(f"eval_{mode}_{k}", float(result[k]), now, step) for k in ("top1_error", "top5_error", "loss")]
    tags = [RunTag(f"eval_{mode}_checkpoint", str(result["checkpoint"]))]
    if mode == "multiscale":
        tags.append(RunTag("eval_multiscale_scales", ",".join(str(s) for s in result["scales"])))
    try:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=metrics, tags=tags)
    except MlflowException as e:
        raise EvaluationError(
            f"{mode}: top-1 error {result['top1_error']:.2f}%, top-5 {result['top5_error']:.2f}%, but logging it "
            f"to MLflow run {run_id} at {tracking_uri} failed ({e}); pass --tracking.uri=<the URI it trained "
            f"with>, or --no-log"
        ) from e


# --------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden as --section.key=value (e.g. --data.root).",
    )
    p.add_argument("--config", required=True, help="the experiment TOML the checkpoint was trained with")
    p.add_argument("--checkpoint", required=True, help="run folder, step folder, local or s3://")
    p.add_argument("--mode", choices=MODES, default="center")
    p.add_argument("--scales", default="224,256,384,480,640", help="multiscale: shorter sides, comma-separated")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per rank and batch (default: data.val_batch_size or data.batch_size)",
    )
    p.add_argument("--json", default="", help="also write the result as JSON here (rank 0)")
    p.add_argument(
        "--no-log", action="store_true", help="do not add the result to the MLflow run that trained the checkpoint"
    )
    return p.parse_known_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate as the command line says; every rank returns the same result."""
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    try:
        scales = tuple(int(s) for s in args.scales.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            f"--scales {args.scales!r}: give comma-separated integers, e.g. 224,256,384,480,640"
        ) from None
    if not scales or min(scales) < 1:
        raise ConfigError(f"--scales {args.scales!r}: give at least one positive shorter-side length")
    if args.mode != "center" and cfg.data.style != "imagenet":
        raise ConfigError(
            f"--mode {args.mode} needs data.style = 'imagenet' (this config has {cfg.data.style!r}); "
            f"CIFAR-style networks are tested on the single image (--mode center)"
        )
    if args.batch_size < 0:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.batch_size:
        cfg.data.val_batch_size = args.batch_size
    env = init_distributed(cfg.distributed)  # as training starts it
    try:
        root = broadcast_object(prepare_dataset_root(cfg.data) if env.rank == 0 else None)
        size_cpu_threads(cfg, env)
        source = split_source(cfg, env, "val", root=root, eval_mode=args.mode, scales=scales)

        def written_for(folder: str, manifest: dict[str, Any]) -> None:
            # Another network of the same shapes (plain-20 and ResNet-20 with option A) would load without a word.
            recorded = manifest.get("model")
            check_model(
                manifest,
                url=folder,
                model=model_record(cfg),
                fix=f"evaluate it with the config it was trained with (model.name = "
                f"{recorded.get('name') if isinstance(recorded, dict) else None!r}), or give the checkpoint of a "
                f"{cfg.model.name} run",
            )
            changes = config_changes(manifest, config=flatten(cfg.experiment()), config_hash=cfg.hash())
            if changes and env.rank == 0:
                log.warning("the config differs from the one that trained %s (%s)", folder, changes)

        state, folder = load_model_state(args.checkpoint, storage=storage_options(cfg.checkpoint), check=written_for)
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            overrides = cfg.model.overrides() or "no overrides"
            raise EvaluationError(
                f"{folder}/{MODEL_FILE} does not fit model.name = {cfg.model.name!r} with "
                f"num_classes = {cfg.model.num_classes} and {overrides} "
                f"({str(e).splitlines()[0]}): evaluate with the config it was trained with"
            ) from e
        model.to(env.device)
        bf16 = cfg.precision.dtype == "bf16" or (cfg.precision.dtype == "auto" and env.device.type == "cuda")
        autocast = torch.bfloat16 if bf16 and env.device.type == "cuda" else None
        result = evaluate_source(
            model,
            source,
            mode=args.mode,
            device=env.device,
            autocast_dtype=autocast,
            # A bar only on a terminal: in a job's log file its redraws would be one endless line.
            progress=env.rank == 0 and cfg.progress and is_terminal(sys.stderr),
        )
        result.update(
            mode=args.mode,
            checkpoint=folder,
            world_size=env.world_size,
            **({"scales": list(scales)} if args.mode == "multiscale" else {}),
        )
        if env.rank == 0 and cfg.tracking.enabled and not args.no_log:
            run_id, step = checkpoint_run(folder, storage=storage_options(cfg.checkpoint))
            if run_id is None:
                log.warning("%s names no MLflow run (no %s): the result is not logged", folder, TRAINER_STATE)
            else:
                uri = resolve_uri(cfg.tracking)
                log_result(result, tracking_uri=uri, run_id=run_id, step=int(step or 0))
                result.update(run_id=run_id, tracking_uri=uri)
        if env.rank == 0 and args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result
    finally:
        close_distributed()


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run(argv)
    except (UserError, ValueError, StorageError) as e:
        report_error(e, rank=rank)
        return 2
    if rank == 0:
        print(
            f"{result['mode']}: top-1 error {result['top1_error']:.2f}%  top-5 error {result['top5_error']:.2f}%  "
            f"({result['images']} images, {result['world_size']} rank(s), {result['checkpoint']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
