"""One training run's components, built from its config on one rank: the one place they are wired together.

``pipeline.train.run`` builds a run here, starts it, fits and closes it; the throughput benchmark
(benchmarks/throughput.py) gets its DeepSpeed trainer here too, so what it times is what users train.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import Checkpointer
from pipeline.checkpoint.layout import committed_tags
from pipeline.config import ConfigError, TrainConfig, flatten, to_toml
from pipeline.core.cpu import ThreadPlan, plan_threads
from pipeline.core.distributed import DistEnv, broadcast_object
from pipeline.core.stop import StopFlag
from pipeline.core.storage import StorageError
from pipeline.data import DataSource, build_source, measurement_batch, prepare_dataset_root
from pipeline.models import build_model, model_spec, train_flops_per_image
from pipeline.runtime.diagnostics import Diagnostics
from pipeline.runtime.engine import TrainingEngine, build_engine
from pipeline.runtime.preflight import check_run
from pipeline.runtime.schedule import LRSchedule, epoch_steps, scaled_lr
from pipeline.tracking import ModelCard, Tracker, build_tracker, resolve_uri
from pipeline.tracking.datasets import dataset_name, describe_split, split_classes
from pipeline.trainer import LoopSettings, Trainer, TrainerParts

log = logging.getLogger("pipeline")

_INLINE_CLASSES = 100  # class names in the model's metadata up to this many; ImageNet's 1,000 go in a file


@dataclass
class TrainingRun:
    """What :func:`build_run` made. ``start`` resumes and opens the tracking run; the caller fits and closes."""

    cfg: TrainConfig
    env: DistEnv
    sources: dict[str, DataSource]  # "train" and "val"
    engine: TrainingEngine
    lr: float  # cfg.optim.lr scaled to the global batch
    global_batch: int  # images per optimizer step over all ranks
    steps_per_epoch: int
    schedule: LRSchedule
    checkpointer: Checkpointer | None
    trainer: Trainer
    tracker: Tracker  # built, not started: start() opens it

    @property
    def run_id(self) -> str:
        return self.cfg.resolved_run_id

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.resolved_output_dir)

    def start(self) -> dict[str, Any] | None:
        """Resume from the run's checkpoint if there is one, open the tracking run (a collective: every rank
        calls it) and, on rank 0, write the run's records. Returns the resumed trainer state, or None."""
        cfg, env, trainer = self.cfg, self.env, self.trainer
        state = None
        if self.checkpointer is not None:
            # Refuses a finished run, another model and another global batch (the checkpointer says which
            # checkpoint and step the run starts from, or that it starts from scratch).
            state = self.checkpointer.resume(self.engine, end_step=self.schedule.total_steps)
        if state is not None:
            trainer.load_state_dict(state)
        # Rank 0 creates or reopens the MLflow run and broadcasts its id.
        self.tracker.start((state or {}).get("tracking_run_id"))
        if env.is_main:
            out_dir = self.output_dir
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.toml").write_text(to_toml(cfg))
            # The config, and the experiment's identity as params too, so the compare view's "Diff only" and
            # parallel coordinates can use depth, residual, ... A resumed run keeps each param's first value
            # (world_size included: the tag shows the current one); a new run logs them all.
            identity = self.identity()
            self.tracker.log_params(self.params(identity))
            # The same as tags, for search; a tag shows the current value (world_size after a resume elsewhere).
            self.tracker.set_tags({**identity, "model": cfg.model.name, **self.engine.fast_path.as_params()})
            if len(trainer.world_sizes) > 1:
                # The world_size tag shows the current size: the sizes the run went through are kept beside it.
                history = ", ".join(f"{w} ranks from step {s}" for s, w in trainer.world_sizes)
                self.tracker.set_tags({"world_size_history": history})
                if trainer.world_sizes[-1][0] == trainer.step:  # the change is this start's
                    log.warning(
                        "run %s goes on at the same global batch on another world size (MLflow tag "
                        "world_size_history: %s)",
                        self.run_id,
                        history,
                    )
            self.tracker.log_inputs(
                [describe_split(cfg.data, split=split, source=source) for split, source in self.sources.items()]
            )
            self.tracker.log_artifact(str(out_dir / "config.toml"))
            log.info(
                "%s: %s, %d ranks on %s%s, global batch %d, lr %g, %d steps (%d per epoch)",
                self.run_id,
                cfg.model.name,
                env.world_size,
                env.device.type,
                f" ({cpu_threads(cfg, env)})" if env.device.type == "cpu" else "",
                self.global_batch,
                self.lr,
                self.schedule.total_steps,
                self.steps_per_epoch,
            )
        return state

    def close(self) -> None:
        """Every rank, after ``fit``: wait until the checkpoints saved are committed (or stranded, see
        ``checkpointer.stranded``) and stop the upload thread. The run's other parts hold nothing to close."""
        if self.checkpointer is not None:
            self.checkpointer.close()

    def identity(self) -> dict[str, str]:
        """What tells this run's experiment apart from another's: the network (depth, residual, shortcut,
        block, ...), the data (name, images per split) and the scale (global batch, world size)."""
        spec = model_spec(self.cfg.model.name, **self.cfg.model.overrides())
        return {
            **spec.tags(),
            "dataset": dataset_name(self.cfg.data),
            **{f"{split}_samples": str(source.num_samples) for split, source in self.sources.items()},
            "global_batch": str(self.global_batch),
            "world_size": str(self.env.world_size),
        }

    def params(self, identity: dict[str, str]) -> dict[str, str]:
        """Every config key and the identity, as MLflow params. A key left empty for the run to resolve is logged
        as what it resolved to (``model.shortcut`` "" as the model's default, the same value as ``shortcut``):
        an empty twin beside the resolved param would be what the UI's column and axis pickers offer first.
        ``lr_effective`` is the peak lr after scaling ``optim.lr`` to the global batch."""
        params = {**flatten(self.cfg), **identity, "lr_effective": f"{self.lr:g}"}
        cfg = self.cfg
        resolved = {
            "model.shortcut": identity["shortcut"],
            "model.stride_in": identity["stride_in"],
            "run_id": cfg.resolved_run_id,
            "tracking.run_name": cfg.tracking.run_name or cfg.name,
            "tracking.uri": resolve_uri(cfg.tracking),
        }
        if self.checkpointer is not None:
            resolved["checkpoint.staging_dir"] = staging_dir(cfg)
        params.update({k: v for k, v in resolved.items() if params.get(k) == ""})
        return params

    def log_model(self) -> None:
        """Rank 0, after the checkpointer closed: the final model, named after the run and logged at its last step
        (linked to its final training and validation metrics), with one preprocessed validation image as input
        example, metadata that says how to feed it (:meth:`model_metadata`) and the last committed checkpoint's
        URI as a tag."""
        if not (self.cfg.tracking.enabled and self.cfg.tracking.log_model):
            return  # nothing would be logged: list no checkpoints for it
        images, _ = next(iter(self.sources["val"]))  # a val source restarts its pass at each iter()
        example = images[:1].float().contiguous().cpu().numpy()
        tags = {}
        if self.checkpointer is not None:
            try:
                committed = committed_tags(self.checkpointer.store)
            except StorageError as e:
                log.warning(
                    "cannot list the checkpoints at %s (%s): the model carries no checkpoint_uri",
                    self.checkpointer.store.uri,
                    e,
                )
                committed = []
            if committed:
                tags["checkpoint_uri"] = self.checkpointer.store.url(committed[0])
        metadata, files = self.model_metadata(checkpoint_uri=tags.get("checkpoint_uri", ""))
        card = ModelCard(step=self.trainer.step, input_example=example, metadata=metadata, extra_files=files)
        self.tracker.log_model(self.engine.module, card=card, tags=tags)

    def model_metadata(self, *, checkpoint_uri: str = "") -> tuple[dict[str, Any], tuple[str, ...]]:
        """How to feed the model and read what it returns, as MLflow model metadata, and the files to log with it:
        the input layout and size, the normalisation (on the 0-255 scale), the class names (more than
        ``_INLINE_CLASSES``: a ``class_index.json`` logged with the model instead), "logits", the config hash and
        the checkpoint."""
        data = self.cfg.data
        size = data.image_size
        metadata: dict[str, Any] = {
            "input": {
                "layout": "NCHW",
                "channels": "RGB",
                "shape": [3, size, size],
                "dtype": "float32",
                "normalisation": {
                    "scale": "0-255",
                    "formula": "(pixel - mean) / std",
                    "mean": list(data.mean),
                    "std": list(data.std),
                    **({"mean_image": data.mean_image} if data.mean_image else {}),
                },
            },
            "output": "logits",
            "num_classes": self.cfg.model.num_classes,
            "config_hash": self.cfg.hash(),
            "checkpoint_uri": checkpoint_uri,
        }
        classes = split_classes(self.sources["val"])
        files: tuple[str, ...] = ()
        if classes and len(classes) <= _INLINE_CLASSES:
            metadata["class_names"] = list(classes)
        elif classes:
            index = self.output_dir / "class_index.json"
            index.write_text(json.dumps({str(i): name for i, name in enumerate(classes)}))
            metadata["class_index"] = f"extra_files/{index.name}"  # where MLflow's pytorch flavor keeps it
            files = (str(index),)
        return metadata, files


def model_record(cfg: TrainConfig) -> dict[str, str]:
    """The network ``cfg`` builds, as checkpoint manifests record it and resume and evaluate compare it: the
    model name, its architecture (depth, blocks, residual, shortcut, ...) and the number of classes."""
    tags = model_spec(cfg.model.name, **cfg.model.overrides()).tags()
    for how_weights_start in ("zero_init_residual", "bn_weight_init"):  # not what the network is
        tags.pop(how_weights_start, None)
    return {"name": cfg.model.name, "num_classes": str(cfg.model.num_classes), **tags}


def staging_dir(cfg: TrainConfig) -> str:
    """Where checkpoints wait for their upload: checkpoint.staging_dir, else the run's output folder."""
    return cfg.checkpoint.staging_dir or str(Path(cfg.resolved_output_dir) / "staging")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_threads(cfg: TrainConfig, env: DistEnv) -> ThreadPlan:
    """The threads of this rank: sized from the cores its node gives its ranks (core.cpu)."""
    return plan_threads(data_threads=cfg.data.num_threads, ranks_here=env.local_world_size)


def size_cpu_threads(cfg: TrainConfig, env: DistEnv) -> None:
    """On the CPU, torch's intra-op pool sized for this rank (its default, every core of the machine, fights
    DALI's threads); a no-op on a GPU, where the host threads only feed the device."""
    if env.device.type != "cpu":
        return
    torch.set_num_threads(cpu_threads(cfg, env).torch)  # said in the run's first line (TrainingRun.start)


def split_source(cfg: TrainConfig, env: DistEnv, split: str, *, root: str | None, **options: Any) -> DataSource:
    """This rank's source for ``split`` of ``cfg``'s dataset (``root``: what prepare_dataset_root gave rank 0;
    ``options``: build_source's evaluation keywords). Training, evaluation and the tests' workers all build
    their sources here, so they shard and seed alike."""
    # DALI's CPU threads never outnumber this rank's share of the cores (core.cpu); the config keeps its value.
    data = dataclasses.replace(cfg.data, num_threads=cpu_threads(cfg, env).data)
    return build_source(
        data,
        split=split,
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
        seed=cfg.seed,
        num_classes=cfg.model.num_classes,
        root=root,
        **options,
    )


def build_run(
    cfg: TrainConfig, *, env: DistEnv, stop: StopFlag | None = None, checkpointing: bool = True, evaluation: bool = True
) -> TrainingRun:
    """Every component of ``cfg``'s run on this rank, each from its own config section. Called on every rank
    of an initialised process group (a collective: rank 0 prepares the dataset and shares its root).

    ``checkpointing=False`` builds no Checkpointer (nothing touches checkpoint.uri) and ``evaluation=False``
    no validation source (the trainer's val source is then the training one): for callers that time
    ``Trainer.train_step`` and never call ``fit``, such as the throughput benchmark.
    """
    # Storage, tracking, data root and GPUs first: a wrong URI fails in seconds, before the model and engine.
    check_run(cfg, env=env, checkpointing=checkpointing)
    size_cpu_threads(cfg, env)
    seed_everything(cfg.seed + env.rank)
    root = broadcast_object(prepare_dataset_root(cfg.data) if env.is_main else None)
    sources = {
        split: split_source(cfg, env, split, root=root) for split in (("train", "val") if evaluation else ("train",))
    }
    model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
    global_batch = cfg.data.batch_size * cfg.distributed.grad_accum * env.world_size
    lr = scaled_lr(cfg.optim.lr, reference_batch=cfg.optim.reference_batch, global_batch=global_batch)
    engine = build_engine(
        model,
        optim=cfg.optim,
        precision=cfg.precision,
        distributed=cfg.distributed,
        lr=lr,
        micro_batch=cfg.data.batch_size,
        world_size=env.world_size,
        device=env.device,
        channels_last=cfg.model.channels_last,
        compile=cfg.model.compile,
        compile_mode=cfg.model.compile_mode,
        compile_backend=cfg.model.compile_backend,
    )
    steps_per_epoch = epoch_steps(sources["train"].num_samples, global_batch=global_batch)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.batch_size = {cfg.data.batch_size} x {env.world_size} ranks x grad_accum "
            f"{cfg.distributed.grad_accum} is larger than the training split "
            f"({sources['train'].num_samples} images): lower --data.batch_size"
        )
    schedule = LRSchedule(cfg.schedule, base_lr=lr, steps_per_epoch=steps_per_epoch)
    checkpointer = None
    if checkpointing:
        checkpointer = Checkpointer(
            cfg.checkpoint,
            run_id=cfg.resolved_run_id,
            rank=env.rank,
            world_size=env.world_size,
            config_hash=cfg.hash(),
            staging_dir=staging_dir(cfg),
            stop=stop,
            record={
                "model": model_record(cfg),
                "config": flatten(cfg.experiment()),
                "global_batch": global_batch,
                "batch_size": cfg.data.batch_size,
                "grad_accum": cfg.distributed.grad_accum,
            },
        )
        checkpointer.check_access()
    tracker = build_tracker(
        cfg.tracking, is_main=env.is_main, node_id=env.node_rank, is_local_main=env.is_local_main, run_name=cfg.name
    )
    diagnostics = None
    if cfg.diagnostics.grad_norms or cfg.diagnostics.response_std:
        diagnostics = Diagnostics(
            cfg.diagnostics,
            module=engine.module,
            optimizer=engine.optimizer,
            rank=env.rank,
            out_dir=cfg.resolved_output_dir,
            # Figure 7's images: every class of the validation set, the same for every net (rank 0 loads them).
            measurement=lambda: measurement_batch(
                cfg.data, device=env.device, num_classes=cfg.model.num_classes, root=root
            )[0],
        )
    trainer = Trainer(
        TrainerParts(
            engine=engine,
            train_source=sources["train"],
            val_source=sources.get("val", sources["train"]),
            schedule=schedule,
            tracker=tracker,
            checkpointer=checkpointer,
            diagnostics=diagnostics,
            stop=stop,
        ),
        loop=LoopSettings(
            total_steps=schedule.total_steps,
            log_every=cfg.log_every,
            eval_every=cfg.eval_every,
            progress=cfg.progress,
            flops_per_image=train_flops_per_image(
                cfg.model.name,
                image_size=cfg.data.image_size,
                num_classes=cfg.model.num_classes,
                **cfg.model.overrides(),
            ),
        ),
        env=env,
    )
    return TrainingRun(
        cfg=cfg,
        env=env,
        sources=sources,
        engine=engine,
        lr=lr,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        checkpointer=checkpointer,
        trainer=trainer,
        tracker=tracker,
    )
