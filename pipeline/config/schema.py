"""The sections of the training config, each checking its own values, and ``TrainConfig``, which holds them
and checks what spans sections; ``load_config`` builds one from a file and overrides (``pipeline.config.loader``
does the generic reading and checking of types)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config.loader import (
    apply_override,
    check_numbers,
    describe_fields,
    describe_path,
    doc,
    from_table,
    read_config_file,
)
from pipeline.core.errors import ConfigError
from pipeline.models import list_models, model_spec

# --------------------------------------------------------------------------------------------------
# Sections. Every field carries its one-line documentation in ``metadata["doc"]`` (``doc(default, text)``).


@dataclass
class ModelConfig:
    name: str = doc("cifar_resnet20", "a name from pipeline.models.list_models()")
    num_classes: int = doc(10, "must equal the number of class folders in the dataset")
    shortcut: Literal["", "A", "B", "C"] = doc("", '"" keeps the model\'s default (A for CIFAR, B for ImageNet)')
    stride_in: Literal["", "3x3", "1x1"] = doc("", 'bottleneck stride placement; "" = model default ("3x3")')
    zero_init_residual: bool = doc(False, "zero the last BN of every residual branch")
    bn_weight_init: Literal["ones", "uniform", "uniform_residual"] = doc(
        "ones",
        'how the BN scales start: "ones" (torchvision; the Caffe Scale layer of the paper\'s released models), '
        '"uniform", U[0,1) for every BN (PyTorch < 1.2), or "uniform_residual", U[0,1) only for the last BN of each '
        "residual branch and 1 elsewhere (the CIFAR paper configs: deep ResNets then train at lr 0.1 from step 0; "
        'a plain net starts exactly as with "ones")',
    )
    channels_last: bool | Literal["auto"] = doc(
        "auto", "NHWC memory format, applied after deepspeed.initialize; auto: on with CUDA"
    )
    compile: Literal["auto", "off", "module", "engine"] = doc(
        "auto",
        "torch.compile: module = in place before deepspeed.initialize, engine = DeepSpeed's engine.compile(); "
        "auto: engine with CUDA, off without",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = doc(
        "default", "torch.compile mode; reduce-overhead adds CUDA graphs (small, launch-bound nets)"
    )
    compile_backend: str = doc(
        "inductor", 'torch.compile backend; "aot_eager" traces forward and backward without generating code (checks)'
    )

    def overrides(self) -> dict[str, Any]:
        """Keyword overrides for ``build_model``: only what the config sets explicitly."""
        out: dict[str, Any] = {}
        if self.shortcut:
            out["shortcut"] = self.shortcut
        if self.stride_in:
            out["stride_in"] = self.stride_in
        if self.zero_init_residual:
            out["zero_init_residual"] = True
        if self.bn_weight_init != "ones":
            out["bn_weight_init"] = self.bn_weight_init
        return out


@dataclass
class DataConfig:
    source: Literal["folder", "digits", "synthetic"] = doc(
        "digits", "folder: ImageFolder at `root`; digits: the offline demo set"
    )
    root: str = doc("", "dataset root holding <train_dir>/<class>/*.jpg and <val_dir>/<class>/*.jpg")
    train_dir: str = doc("train", "training split folder under root")
    val_dir: str = doc("val", 'validation split folder under root ("test" for CIFAR-10)')
    style: Literal["cifar", "imagenet"] = doc("cifar", "augmentation family: pad+crop+flip, or crop+flip at 224")
    image_size: int = doc(32, "training/eval crop size")
    flip: bool = doc(True, "random horizontal flip in training (off for digits, whose mirror images change meaning)")
    val_resize: int = doc(256, "ImageNet eval: shorter side resized to this before the center crop")
    batch_size: int = doc(128, "per-rank micro-batch")
    num_threads: int = doc(2, "DALI CPU threads per rank")
    prefetch: int = doc(2, "DALI prefetch queue depth")
    decoder: Literal["auto", "cpu", "mixed"] = doc("auto", "auto: GPU (mixed) decoding when CUDA is present")
    mean: list[float] = field(
        default_factory=lambda: [0.485 * 255, 0.456 * 255, 0.406 * 255],
        metadata={"doc": "per-channel mean, 0-255 scale (ImageNet's)"},
    )
    std: list[float] = field(
        default_factory=lambda: [0.229 * 255, 0.224 * 255, 0.225 * 255],
        metadata={"doc": "per-channel std, 0-255 scale (ImageNet's)"},
    )
    synthetic_batches: int = doc(20, "synthetic source: batches per epoch")
    cache_dir: str = doc(".cache/datasets", "where generated/extracted datasets live")
    root_sha256: str = doc(
        "",
        'expected sha256 of data.root when it is a .tar.gz/.tgz/.tar archive (checked before extracting); "" = '
        "unchecked",
    )
    in_memory: bool = doc(
        False,
        "decode each split once (DALI) into device memory and augment per batch with tensor ops (CIFAR-sized data)",
    )
    val_batch_size: int = doc(
        0, "evaluation micro-batch; 0 = batch_size (one that divides the val split keeps a single compiled shape)"
    )
    augment: Literal["paper", "rrc"] = doc(
        "paper",
        'imagenet style: "paper" = shorter side random in data.scale, then a random image_size crop (He et '
        'al. 3.4); "rrc" = random-resized crop (modern recipe)',
    )
    scale: list[int] = field(
        default_factory=lambda: [256, 480], metadata={"doc": 'augment = "paper": [min, max] of the random shorter side'}
    )
    lighting: float = doc(
        0.1, "imagenet style: std of AlexNet's PCA colour augmentation (0.1 in the paper); 0 disables"
    )
    mean_image: str = doc(
        "",
        "the paper's per-pixel mean (.npy, image_size x image_size x 3, 0-255) subtracted instead of data.mean; a "
        'relative path is under data.root ("mean_image.npy" is what `python -m pipeline.tools.prepare` writes; '
        "CIFAR: `prepare mean-image ROOT --size 32 --resize 32`)",
    )
    exclude_list: str = doc(
        "",
        "list written by `python -m pipeline.tools.validate --write-list`: images to skip or to read from a "
        'converted copy; "" = none',
    )
    format: Literal["files", "shards"] = doc(
        "files",
        "files: an ImageFolder tree of images; shards: each split folder holds WebDataset tar shards + manifest.json "
        "(`python -m pipeline.tools.prepare ... --format shards`), read by DALI from local files (an s3:// root goes "
        "through the node-local cache in data.cache_dir)",
    )
    cache_bytes: int = doc(
        256 << 30,
        "shards on s3://: most bytes of shards the node keeps in data.cache_dir (shared by its ranks; a split that "
        "fits is fetched once and reused every epoch)",
    )

    def __post_init__(self) -> None:
        # data.root may stay empty here: the data layer takes the root from its caller; a run needs one
        # (TrainConfig checks it).
        self._check_each_value()
        self._check_combinations()

    def _check_each_value(self) -> None:
        """The keys that are wrong on their own, whatever the others say."""
        check_numbers(
            self, "data.", at_least={"num_threads": 1, "prefetch": 1, "val_resize": 1, "synthetic_batches": 1}
        )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size = {self.batch_size}: must be >= 1")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("data.mean and data.std must each have 3 values (R, G, B, 0-255 scale)")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std = {self.std}: every value must be > 0")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size = {self.image_size}: must be >= 8")
        if self.root_sha256 and (
            len(self.root_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.root_sha256)
        ):
            raise ConfigError(
                f"data.root_sha256 = {self.root_sha256!r}: must be 64 lowercase hex digits (sha256sum's output) "
                "or empty"
            )
        if self.val_batch_size < 0:
            raise ConfigError(f"data.val_batch_size = {self.val_batch_size}: must be >= 0 (0 = data.batch_size)")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(
                f"data.scale = {self.scale}: must be [min, max] shorter-side lengths with 0 < min <= max "
                f"(the paper: [256, 480])"
            )
        if self.lighting < 0:
            raise ConfigError(f"data.lighting = {self.lighting}: must be >= 0 (0 disables the colour augmentation)")
        if self.format not in ("files", "shards"):
            raise ConfigError(f"data.format = {self.format!r}: must be 'files' or 'shards'")
        if self.cache_bytes < 1:
            raise ConfigError(
                f"data.cache_bytes = {self.cache_bytes}: must be >= 1 (bytes of shards in data.cache_dir)"
            )

    def _check_combinations(self) -> None:
        """The keys that only some sources, styles or formats allow."""
        if self.in_memory and (self.source == "synthetic" or self.style != "cifar"):
            raise ConfigError(
                f"data.in_memory = true needs data.style = 'cifar' and an image dataset (folder or digits); got "
                f"source {self.source!r}, style {self.style!r}"
            )
        if self.style == "imagenet" and self.augment == "paper" and self.scale[0] < self.image_size:
            raise ConfigError(
                f"data.scale = {self.scale} starts below data.image_size = {self.image_size}: the random "
                f"{self.image_size}x{self.image_size} crop would not fit; raise data.scale[0]"
            )
        if self.style == "imagenet" and self.val_resize < self.image_size:
            raise ConfigError(
                f"data.val_resize = {self.val_resize} is below data.image_size = {self.image_size}: the "
                f"{self.image_size}x{self.image_size} centre crop would not fit; raise data.val_resize"
            )
        if self.format == "shards" and (self.source != "folder" or self.in_memory):
            raise ConfigError(
                f"data.format = 'shards' reads a sharded dataset at data.root: it needs data.source = 'folder' and "
                f"data.in_memory = false (got source {self.source!r}, in_memory {self.in_memory})"
            )


@dataclass
class OptimConfig:
    lr: float = doc(0.1, "learning rate at reference_batch images per step (the paper: 0.1 at 256)")
    reference_batch: int = doc(256, "linear scaling rule: lr_used = lr * global_batch / reference_batch")
    momentum: float = doc(0.9, "SGD momentum")
    nesterov: bool = doc(False, "Nesterov momentum")
    weight_decay: float = doc(1e-4, "L2 weight decay")
    no_decay_bn_bias: bool = doc(False, "exempt BN parameters and biases from weight decay")
    grad_clip: float = doc(0.0, "clip the global gradient norm to this; 0 disables")
    fused: bool | Literal["auto"] = doc("auto", "fused SGD: one kernel for the whole update; auto: on with CUDA")

    def __post_init__(self) -> None:
        check_numbers(self, "optim.", at_least={"weight_decay": 0, "grad_clip": 0})
        if self.lr <= 0:
            raise ConfigError(f"optim.lr = {self.lr}: must be > 0")
        if self.reference_batch < 1:
            raise ConfigError(f"optim.reference_batch = {self.reference_batch}: must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum = {self.momentum}: must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov = true needs optim.momentum > 0")


@dataclass
class ScheduleConfig:
    kind: Literal["step", "multistep", "cosine", "plateau", "constant"] = doc(
        "multistep", "step == multistep with `milestones`"
    )
    epochs: int = doc(10, "training length in epochs of the training split (ignored when max_steps > 0)")
    max_steps: int = doc(
        0,
        "training length in optimizer steps; > 0 overrides epochs (the CIFAR recipe counts iterations; a smaller "
        "value truncates any schedule, e.g. a smoke run: milestones and warmup keep their unit)",
    )
    unit: Literal["epoch", "step"] = doc("epoch", "unit of milestones and warmup")
    milestones: list[int] = field(
        default_factory=list, metadata={"doc": "multistep: divide lr by 1/gamma at each of these"}
    )
    gamma: float = doc(0.1, "multistep/plateau factor")
    warmup: int = doc(0, "linear warm-up length (in `unit`) from warmup_factor*lr to lr")
    warmup_factor: float = doc(0.1, "starting fraction of lr during warm-up")
    warmup_until_error: float = doc(
        0.0, ">0: hold lr*warmup_factor until train top-1 error < this (ResNet-110 recipe), then full lr"
    )
    plateau_patience: int = doc(5, "plateau: evaluations without improvement before dividing")
    plateau_threshold: float = doc(1e-3, "plateau: minimum val-error improvement that counts")
    min_lr: float = doc(0.0, "cosine floor")

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "schedule.",
            at_least={
                "epochs": 0,
                "max_steps": 0,
                "warmup": 0,
                "warmup_until_error": 0,
                "plateau_patience": 0,
                "plateau_threshold": 0,
                "min_lr": 0,
            },
        )
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError("schedule.epochs and schedule.max_steps are both < 1: set one of them")
        if self.kind in ("step", "multistep"):
            if sorted(self.milestones) != list(self.milestones) or len(set(self.milestones)) != len(self.milestones):
                raise ConfigError(f"schedule.milestones = {self.milestones}: must be strictly increasing")
            # Epoch milestones lie inside the epoch budget; step milestones only need to be positive: a max_steps
            # (a smoke run, say) that ends before some of them truncates the schedule, it does not redefine it.
            limit = self.epochs if self.unit == "epoch" else None
            if any(m <= 0 or (limit is not None and m >= limit) for m in self.milestones):
                raise ConfigError(
                    f"schedule.milestones = {self.milestones}: each must lie inside "
                    f"{f'(0, {limit}) epochs' if limit is not None else '(0, inf) steps'}"
                )
        if not 0 < self.gamma < 1:
            raise ConfigError(f"schedule.gamma = {self.gamma}: must be in (0, 1)")
        if not 0 < self.warmup_factor <= 1:
            raise ConfigError(f"schedule.warmup_factor = {self.warmup_factor}: must be in (0, 1]")


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "auto"] = doc(
        "auto", "bf16 = DeepSpeed torch_autocast (fp32 master weights); auto: bf16 with CUDA, fp32 without"
    )
    cudnn_benchmark: bool | Literal["auto"] = doc(
        "auto", "cuDNN times its convolution algorithms once per shape; auto: on with CUDA"
    )


@dataclass
class DistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = doc("auto", "auto: nccl with CUDA, gloo without")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage; 0 or 1 are supported for SGD convnets")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    timeout_s: int = doc(600, "collective timeout; a dead peer fails the job instead of hanging forever")

    def __post_init__(self) -> None:
        check_numbers(self, "distributed.", at_least={"timeout_s": 1})
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"distributed.zero_stage = {self.zero_stage}: allowed values are 0 and 1")
        if self.grad_accum < 1:
            raise ConfigError(f"distributed.grad_accum = {self.grad_accum}: must be >= 1")


@dataclass
class CheckpointConfig:
    uri: str = doc("runs/checkpoints", "local folder, file:// or s3://bucket/prefix")
    every_steps: int = doc(0, "save every N optimizer steps; 0 disables")
    every_minutes: float = doc(0.0, "save every T minutes; 0 disables")
    at_end: bool = doc(True, "save when training finishes")
    keep_last: int = doc(2, "keep the newest K committed checkpoints")
    keep_every: int = doc(0, "additionally keep every M-th step checkpoint; 0 disables")
    resume: str = doc(
        "auto",
        '"auto": the newest committed checkpoint of this run_id, from scratch when it has none (what a SLURM '
        'requeue needs; a finished run is refused); "never": start from scratch (committed checkpoints of this '
        "run_id are set aside as step-*/manifest.set-aside.json); or a checkpoint URI (a run or step folder, "
        "local or s3://). Also --resume on the command line",
    )
    staging_dir: str = doc("", 'node-local staging folder; "" = <output_dir>/staging')
    endpoint_url: str = doc(
        "", 'S3 endpoint; "" = $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL (credentials: environment or profile only)'
    )
    region: str = doc("", 'S3 region; "" = $AWS_REGION or $AWS_DEFAULT_REGION')
    profile: str = doc("", 'AWS profile to take credentials from; "" = $AWS_PROFILE or the default chain')
    max_pending: int = doc(
        2, "saves whose upload may still run while training goes on; one more save waits for the oldest"
    )
    time_check_steps: int = doc(10, "every_minutes: steps between agreeing on rank 0's clock (one small CPU broadcast)")
    close_timeout_min: float = doc(60.0, "at the end or on a stop signal, wait at most this long for pending commits")
    max_wait_s: float = doc(
        900.0,
        "a save that finds max_pending uploads still pending waits at most this long (heeding stop signals), then "
        "the run fails naming the staged steps: training never sits blocked on storage for longer",
    )
    stop_wait_s: float = doc(
        30.0,
        "after a stop signal, how long the last commits may wait without upload progress before the run exits "
        "with the stop code anyway, leaving the unsent steps in the staging folder (a next start that sees it "
        "uploads them)",
    )
    connect_timeout_s: float = doc(5.0, "S3: seconds to open a connection before the request fails and is retried")
    read_timeout_s: float = doc(
        60.0, "S3: seconds a request may wait for the server (one checkpoint part) before it fails and is retried"
    )

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "checkpoint.",
            at_least={
                "keep_last": 1,
                "every_steps": 0,
                "every_minutes": 0,
                "keep_every": 0,
                "max_pending": 1,
                "time_check_steps": 1,
            },
            above={
                "close_timeout_min": 0,
                "max_wait_s": 0,
                "stop_wait_s": 0,
                "connect_timeout_s": 0,
                "read_timeout_s": 0,
            },
        )
        if not self.uri:
            raise ConfigError("checkpoint.uri is empty: give a local folder, file:///path or s3://bucket/prefix")
        if not self.resume.strip():
            raise ConfigError(
                'checkpoint.resume is empty: give "auto", "never" or a checkpoint URI (a run or step folder)'
            )


@dataclass
class TrackingConfig:
    enabled: bool = doc(True, "log to MLflow from global rank 0")
    uri: str = doc("", 'MLflow tracking URI; "" = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db')
    experiment: str = doc("resnet-depth-study", "MLflow experiment name")
    run_name: str = doc("", '"" = the config name')
    study: str = doc("", "study name tag (set by pipeline.study)")
    parent_run_id: str = doc("", "nested under this MLflow run (set by pipeline.study)")
    system_metrics: bool = doc(True, "MLflow's system metrics (CPU, memory, disk, network, GPU) from every node")
    system_metrics_interval_s: float = doc(10.0, "seconds between system-metric samples on each node")
    flush_interval_s: float = doc(2.0, "seconds between metric batches (log_batch) sent to MLflow")
    max_buffered: int = doc(100000, "metric points held while MLflow is unreachable; beyond it the oldest are dropped")
    start_timeout_s: float = doc(15.0, "how long rank 0 waits for MLflow at start before training on without it")
    required: bool = doc(
        False,
        "true: a tracking URI that cannot be reached (or is no MLflow server) fails the run at start-up (exit 2); "
        "false: the run warns and starts anyway, its metrics buffered until the server answers (tracking.enabled = "
        "false turns both off)",
    )
    finish_timeout_s: float = doc(60.0, "how long the end of a run waits for MLflow to take what is buffered")
    log_model: bool = doc(
        True, "log the final model (named after the run, with a signature and an input example) at the end"
    )
    register_model: bool = doc(
        False, "also register the logged model under the run's name, tagged with the checkpoint it came from"
    )

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "tracking.",
            at_least={"max_buffered": 1},
            above={"flush_interval_s": 0, "start_timeout_s": 0, "finish_timeout_s": 0},
        )
        if self.system_metrics_interval_s <= 0:
            raise ConfigError("tracking.system_metrics_interval_s must be > 0 (seconds between system-metric samples)")


@dataclass
class DiagnosticsConfig:
    """The paper's own evidence (section 4.1, Figure 7) that the degradation is not vanishing signals; off by
    default because each costs a little time, on in the studies (configs/study/*.toml)."""

    grad_norms: bool = doc(
        False, "per-stage gradient norms (grad_norm/stem, grad_norm/layer1.., grad_norm/fc) at every log_every step"
    )
    response_std: bool = doc(
        False,
        "Figure 7: std of each 3x3 layer's response (after BN, before addition and ReLU) on a fixed, "
        "class-stratified set of validation images, at every evaluation and at the end: per-stage metrics at "
        "each (a line per stage in MLflow) and the per-layer numbers as diagnostics/response_std.json",
    )
    response_std_steps: list[int] = field(
        default_factory=list,
        metadata={"doc": "response_std: also measure after these optimizer steps (each also as a JSON artifact)"},
    )
    response_std_every: int = doc(
        0, "response_std: also measure every this many optimizer steps (0: at evaluations and the end only)"
    )

    def __post_init__(self) -> None:
        check_numbers(self, "diagnostics.", at_least={"response_std_every": 0})
        if any(s < 1 for s in self.response_std_steps):
            raise ConfigError(f"diagnostics.response_std_steps = {self.response_std_steps}: steps must be >= 1")
        for key in ("response_std_steps", "response_std_every"):
            if getattr(self, key) and not self.response_std:
                raise ConfigError(f"diagnostics.{key} is set but diagnostics.response_std = false: enable it")


@dataclass
class TrainConfig:
    name: str = doc("run", "run name; also the default MLflow run name")
    output_dir: str = doc("runs/{name}", "where the resolved config, logs and staging go; {name} is substituted")
    run_id: str = doc("", 'stable id of this run across restarts; "" = derived from name (SLURM requeues keep it)')
    seed: int = doc(0, "base seed; rank r uses seed + r for its own randomness")
    log_every: int = doc(10, "optimizer steps between metric reductions (no host sync in between)")
    eval_every: int = doc(1, "epochs between validation passes")
    progress: bool = doc(
        True, "rank-0 progress bar when stderr is a terminal; otherwise (or false) a log line every log_every steps"
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        # Each section checked itself when it was built; what follows needs more than one section.
        check_numbers(self, "", at_least={"seed": 0})  # numpy and DALI seeds are unsigned

        if self.data.source == "folder" and not self.data.root:
            raise ConfigError(
                "data.root is empty but data.source = 'folder': set data.root to an ImageFolder "
                "directory (with train/ and val/ inside), or use data.source = 'digits' for the offline "
                "demo set"
            )
        if self.model.name not in list_models():
            raise ConfigError(
                f"model.name = {self.model.name!r} is not a registered model; allowed: {', '.join(list_models())}"
            )
        try:
            spec = model_spec(self.model.name, **self.model.overrides())
        except ValueError as e:
            raise ConfigError(f"model: {e}") from e
        if self.model.num_classes < 2:
            raise ConfigError(f"model.num_classes = {self.model.num_classes}: must be >= 2")
        if spec.stem == "cifar" and self.data.style == "imagenet":
            raise ConfigError(
                f"model.name = {self.model.name!r} is a CIFAR network but data.style = 'imagenet'; "
                "use data.style = 'cifar' or an ImageNet model (resnetNN / plainNN)"
            )
        if self.log_every < 1 or self.eval_every < 1:
            raise ConfigError("log_every and eval_every must be >= 1")

    @property
    def resolved_run_id(self) -> str:
        """``run_id``, or the run's name when it is empty: the run's checkpoint folder under checkpoint.uri."""
        return self.run_id or self.name

    @property
    def resolved_output_dir(self) -> str:
        return self.output_dir.replace("{name}", self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short hash of what defines the experiment (recorded in checkpoint manifests).

        Where things are written or logged (output, checkpoint and tracking sections, progress, the
        run's names) is left out, so a requeued or relocated run still matches its checkpoints; so are the
        diagnostics, which only read the model.
        """
        return hashlib.sha256(json.dumps(self.experiment(), sort_keys=True).encode()).hexdigest()[:16]

    def experiment(self) -> dict[str, Any]:
        """The part of the config that ``hash`` covers (manifests record it flattened, so that a resume under
        another config can name the keys that changed)."""
        d = self.to_dict()
        for key in ("name", "output_dir", "run_id", "progress", "checkpoint", "tracking", "diagnostics"):
            d.pop(key, None)
        return d


# --------------------------------------------------------------------------------------------------
# Building a TrainConfig


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML file and its bases (or start from the defaults), apply dotted overrides, build
    (which validates)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} {describe_path(p)}; pass an existing TOML file with --config "
                f"(examples live in configs/)"
            )
        data = read_config_file(p)
        data.setdefault("name", p.stem)
    for item in overrides or []:
        apply_override(data, item)
    return from_table(TrainConfig, data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return from_table(TrainConfig, data)


def describe() -> str:
    """Every key of the training config with its default and its documentation, as a TOML file (what
    ``--help-config`` prints)."""
    return describe_fields(TrainConfig())
