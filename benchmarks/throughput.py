"""Training throughput of the project's step (DeepSpeed engine + Trainer.train_step) against plain PyTorch.

For each model and data source it builds the real pieces as training does (a TrainConfig through
``pipeline.wiring.build_run``), runs warm-up steps (compilation included) and then timed steps of
``Trainer.train_step``, and prints one JSON line per configuration: images/s, step time, the share of wall
time spent waiting for data, peak memory, and model FLOP utilisation against a matmul peak measured in the
same process (bf16 on a GPU, fp32 on the CPU). In the same process it times a hand-written PyTorch reference step
(same model and precision, channels_last, fused SGD with momentum, optionally compiled, synthetic data),
so every row carries its ratio to the reference from the same machine and minute.

    # one H100: ResNet-50 from JPEG files through DeepSpeed, eager and compiled, with both references
    python benchmarks/throughput.py --model resnet50:256 --data synthetic,folder:/data/jpegs \\
        --compile off,engine --reference eager,compiled --out results.jsonl
    # the DALI pipeline alone, no model
    python benchmarks/throughput.py --model resnet50:256 --data folder:/data/jpegs --pipeline-only
    # a training config as it is (the CIFAR in-memory path), with dotted overrides
    python benchmarks/throughput.py --config configs/cifar10/cifar_resnet20.toml --set data.root=...
    # the CPU smoke test's size
    python benchmarks/throughput.py --device cpu --model cifar_resnet20:8 --image-size 32 --steps 2
    python benchmarks/throughput.py --table results.jsonl      # the summary table of a results file

``--data`` takes ``synthetic``, ``folder:DIR`` (an ImageFolder, of which only train/ is read, decoded by
DALI) and ``s3://bucket/prefix`` (the same layout in S3, listed by pipeline.core.storage and read by DALI's own
S3 client; ``--s3-endpoint`` or $AWS_ENDPOINT_URL for S3-compatible stores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from pipeline.config import (
    DataConfig,
    DistributedConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
    load_config,
)
from pipeline.core.distributed import DistEnv, init_distributed
from pipeline.data import build_source, prepare_dataset_root
from pipeline.data.folder import list_classes
from pipeline.models import build_model, train_flops_per_image
from pipeline.runtime.engine import FastPath, resolve_fast_path
from pipeline.trainer import Trainer
from pipeline.wiring import build_run

PROCESS_START = time.time()  # the probe reports how long start-up (imports, data, engine) took


# -- what one configuration is -------------------------------------------------------------------------
@dataclass
class Case:
    model: str
    batch: int
    image_size: int
    data: str  # "synthetic", "folder:DIR", "s3://...", "config"
    compile: str = "off"
    augment: str = "paper"  # ImageNet style: the paper's scale augmentation + lighting, or random-resized crop
    cfg: TrainConfig | None = None  # --config runs: everything else comes from here
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.model, self.batch, self.image_size)


def _now() -> float:
    return time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
    }
    for mod, key in (("deepspeed", "deepspeed"), ("nvidia.dali", "dali")):
        try:
            env[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - reported as missing, the benchmark itself says what failed
            env[key] = None
    env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return env


# -- the peak the FLOP utilisation is measured against ------------------------------------------------
def matmul_peak(device: torch.device, *, size: int = 0, seconds: float = 1.0) -> dict[str, Any]:
    """Dense matmul FLOP/s: bf16 on a GPU (the tensor-core peak the bf16 step can reach), fp32 on the CPU."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size or (8192 if cuda else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, t0 = 0, _now()
    while True:
        for _ in range(5):
            a @ b
        iters += 5
        _sync(device)
        if _now() - t0 >= seconds:
            break
    dt = _now() - t0
    return {
        "kind": "matmul_peak",
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "tflops": 2 * n**3 * iters / dt / 1e12,
    }


def _peak_mem_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- what one configuration trains --------------------------------------------------------------------------------
def bench_config(case: Case, args: argparse.Namespace) -> TrainConfig:
    """The training config of ``case``: a --config file as it is, or one built from the command line. Either way
    nothing is tracked, and the lr is constant (the benchmark's steps never reach a schedule's milestones)."""
    if case.cfg is not None:
        cfg = case.cfg
        return replace(
            cfg, progress=False, schedule=ScheduleConfig(kind="constant"), tracking=replace(cfg.tracking, enabled=False)
        )
    style = "cifar" if case.model.startswith("cifar_") else "imagenet"
    # The project's ImageNet recipes: "paper" (configs/imagenet: shorter side in [256, 480], crop, PCA lighting
    # 0.1) or "rrc" (configs/imagenet/modern: random-resized crop, no lighting).
    data = DataConfig(
        source="synthetic",
        style=style,
        image_size=case.image_size,
        val_resize=case.image_size,
        batch_size=case.batch,
        num_threads=args.threads,
        prefetch=args.prefetch,
        decoder=args.decoder,
        synthetic_batches=64,
        augment=case.augment,  # type: ignore[arg-type]
        lighting=0.1 if case.augment == "paper" else 0.0,
        scale=[max(256, case.image_size), max(480, case.image_size)],
    )
    num_classes = args.num_classes
    if case.data.startswith(("folder:", "s3://")):
        root = case.data.removeprefix("folder:")
        if root.startswith("s3://") and args.s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint  # the listing (pipeline.core.storage) and DALI's reader
        # Only train/ is needed (val_dir = train); the class count is the tree's, so any tree works.
        data = replace(data, source="folder", root=root, val_dir="train")
        train = root.rstrip("/") + "/train" if root.startswith("s3://") else os.path.join(root, "train")
        num_classes = len(list_classes(train))
    elif case.data != "synthetic":
        raise ValueError(f"--data {case.data!r}: use synthetic, folder:DIR or s3://bucket/prefix")
    model = replace(
        TrainConfig().model,
        name=case.model,
        num_classes=num_classes,
        channels_last=args.channels_last,
        compile=case.compile,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
    )
    return TrainConfig(
        name=f"bench-{case.model}",
        progress=False,
        model=model,
        data=data,
        optim=OptimConfig(lr=0.1, reference_batch=256),
        schedule=ScheduleConfig(kind="constant"),
        precision=PrecisionConfig(dtype=args.precision),
        distributed=DistributedConfig(),
        tracking=TrackingConfig(enabled=False),
    )


def build_data(case: Case, args: argparse.Namespace, device: torch.device):
    """The training source of ``case`` alone (--pipeline-only: no engine, no process group)."""
    cfg = bench_config(case, args)
    return build_source(
        cfg.data,
        split="train",
        rank=0,
        world_size=1,
        device=device,
        seed=cfg.seed,
        num_classes=cfg.model.num_classes,
        root=prepare_dataset_root(cfg.data),
    )


IMAGENET_TRAIN_IMAGES = 1_281_167


class Endless:
    """Batches of ``source`` epoch after epoch; ``first`` says whether the last one opened an epoch.

    A training source's epoch boundary can cost far more than a batch (DaliSource builds a new DALI pipeline
    for every epoch), and a benchmark set of a few thousand images has a boundary every few dozen steps
    where ImageNet has one every 5,000: the timing keeps those waits apart."""

    def __init__(self, source) -> None:
        self.source = source
        self.first = False
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __iter__(self) -> Endless:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.first = self._it is None
        if self._it is None:
            self._it = iter(self.source)
        try:
            return next(self._it)
        except StopIteration:
            self._it, self.first = iter(self.source), True
            return next(self._it)


# -- the project's step ---------------------------------------------------------------------------------------
def build_trainer(case: Case, args: argparse.Namespace, env: DistEnv, *, evaluation: bool = False) -> Trainer:
    """The DeepSpeed trainer of ``case``, wired by pipeline.wiring.build_run exactly as pipeline.train wires it.

    Only ``train_step`` (and in the probe ``evaluate``) is timed, never ``fit``: no checkpointer is built, and
    without ``evaluation`` the validation source is the training one."""
    return build_run(bench_config(case, args), env=env, checkpointing=False, evaluation=evaluation).trainer


def count_host_syncs(step, batches, device: torch.device, steps: int = 3) -> int | None:
    """Synchronising CUDA calls torch makes inside ``steps`` steps (DALI's own waits are not torch's)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step(*next(batches))
            _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(step, batches, device: torch.device, *, warmup: int, steps: int, seconds: float) -> dict[str, float]:
    """Warm up (compilation happens here), then time ``steps`` steps (or at least ``seconds``)."""
    t0 = _now()
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    warmup_s = _now() - t0
    wait = boundary_wait = 0.0
    n = images = boundaries = 0
    t0 = _now()
    while n < steps or _now() - t0 < seconds:
        t = _now()
        x, y = next(batches)
        dt = _now() - t
        wait += dt
        if getattr(batches, "first", False):
            boundaries += 1
            boundary_wait += dt
        step(x, y)
        n += 1
        images += y.shape[0]
    _sync(device)
    wall = _now() - t0
    out = {
        "img_s": images / wall,
        "step_ms": 1000 * wall / n,
        "data_wait_share": wait / wall,
        "steps": n,
        "warmup_s": warmup_s,
        "wall_s": wall,
    }
    if boundaries:
        # Within epochs, and what an ImageNet-sized epoch (one boundary per 1.28M images) would give.
        inner = wall - boundary_wait
        per_boundary = boundary_wait / boundaries
        out.update(
            epoch_starts=boundaries,
            epoch_start_s=per_boundary,
            img_s_in_epoch=images / inner,
            data_wait_share_in_epoch=(wait - boundary_wait) / inner,
            img_s_imagenet_epoch=IMAGENET_TRAIN_IMAGES / (IMAGENET_TRAIN_IMAGES * inner / images + per_boundary),
        )
    return out


# -- the hand-written reference ---------------------------------------------------------------------------------
def reference_step(
    case: Case,
    fast: FastPath,
    device: torch.device,
    *,
    compiled: bool,
    num_classes: int,
    compile_mode: str,
    compile_backend: str,
):
    """Plain PyTorch: same model and precision, channels_last, fused SGD with momentum, synthetic data."""
    model = build_model(case.model, num_classes=num_classes).to(device)
    fmt = torch.channels_last if fast.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if compiled:
        kwargs: dict[str, Any] = {"dynamic": False, "backend": compile_backend}
        if compile_mode != "default":
            kwargs["mode"] = compile_mode
        model.compile(**kwargs)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **({"fused": True} if fast.fused_sgd else {})
    )
    bf16 = fast.dtype == "bf16"

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=gen).to(device, memory_format=fmt)
    y = torch.randint(0, num_classes, (case.batch,), generator=gen).to(device)
    return step, x, y


# -- one configuration -------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, dist_env: DistEnv | None = None) -> None:
        self.args = args
        self.device = device
        self.dist_env = dist_env  # pipeline.core.distributed's DistEnv; None with --pipeline-only (no process group)
        self.env = environment(device)
        self.peak: dict[str, Any] = {}
        self.refs: dict[tuple, dict[str, float]] = {}  # (model, batch, size) -> {"eager": img/s, "compiled": ...}
        self.rows: list[dict[str, Any]] = []
        self._compiled_model = ""

    def emit(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "device": self.device.type, "device_name": self.env["device_name"]}
        line = json.dumps(row, sort_keys=True)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(line + "\n")
        self.rows.append(row)
        return row

    def _fresh_compile_state(self, model: str) -> None:
        # Graphs of another network would only count against dynamo's recompile limit; another instance
        # of the same network reuses them (parameters are graph inputs), as a second run on the machine
        # would find them in the compile cache.
        import torch._dynamo as dynamo

        if model != self._compiled_model:
            dynamo.reset()
            self._compiled_model = model
        _reset_peak(self.device)

    def _mfu(self, img_s: float, model: str, image_size: int, num_classes: int) -> float | None:
        if not self.peak.get("tflops"):
            return None
        return (
            img_s
            * train_flops_per_image(model, image_size=image_size, num_classes=num_classes)
            / (self.peak["tflops"] * 1e12)
        )

    def matmul(self) -> None:
        self.peak = self.emit({**matmul_peak(self.device, size=self.args.matmul_size), **self.env})

    def reference(self, case: Case, *, compiled: bool) -> None:
        a = self.args
        label = "compiled" if compiled else "eager"
        cfg = case.cfg
        fast = resolve_fast_path(
            device=self.device,
            dtype=cfg.precision.dtype if cfg else a.precision,
            channels_last=cfg.model.channels_last if cfg else a.channels_last,
            fused=cfg.optim.fused if cfg else "auto",
        )
        mode = cfg.model.compile_mode if cfg else a.compile_mode
        backend = cfg.model.compile_backend if cfg else a.compile_backend
        num_classes = cfg.model.num_classes if cfg else a.num_classes
        base = {
            "kind": "reference",
            "model": case.model,
            "batch": case.batch,
            "image_size": case.image_size,
            "data": "synthetic",
            "compile": label,
            "compile_mode": mode if compiled else "",
            "dtype": fast.dtype,
            "channels_last": fast.channels_last,
        }
        try:
            self._fresh_compile_state(case.model)
            step, x, y = reference_step(
                case,
                fast,
                self.device,
                compiled=compiled,
                num_classes=num_classes,
                compile_mode=mode,
                compile_backend=backend,
            )
            batches = iter(lambda: (x, y), None)
            r = timed(
                step,
                batches,
                self.device,
                warmup=a.warmup + (a.compile_warmup if compiled else 0),
                steps=a.steps,
                seconds=a.seconds,
            )
            mem, mem_kind = _peak_mem_mb(self.device)
            self.refs.setdefault(case.key, {})[label] = r["img_s"]
            self.emit(
                {
                    **base,
                    **r,
                    "peak_mem_mb": mem,
                    "peak_mem_kind": mem_kind,
                    "mfu": self._mfu(r["img_s"], case.model, case.image_size, num_classes),
                }
            )
        except Exception as e:  # noqa: BLE001 - one failed configuration must not cost the others
            self.emit({**base, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})

    def deepspeed(self, case: Case) -> dict[str, Any]:
        a = self.args
        base = {
            "kind": "deepspeed",
            "model": case.model,
            "batch": case.batch,
            "image_size": case.image_size,
            "data": case.data,
            "compile": case.compile,
            **case.extra,
        }
        if case.cfg is None and case.data != "synthetic":
            base["augment"] = case.augment
        try:
            self._fresh_compile_state(case.model)
            trainer = build_trainer(case, a, self.dist_env, evaluation=bool(a.probe_dir) and case.cfg is not None)
            source = trainer.train_source
            fast: FastPath = trainer.engine.fast_path
            base.update(
                compile=fast.compile,
                compile_mode=fast.compile_mode if fast.compile != "off" else "",
                dtype=fast.dtype,
                channels_last=fast.channels_last,
                fused_sgd=fast.fused_sgd,
                cudnn_benchmark=fast.cudnn_benchmark,
                source=type(source).__name__,
            )
            batches = Endless(source)
            warm = a.warmup + (a.compile_warmup if fast.compile != "off" else 0)
            if a.probe_dir:
                return self._probe(case, base, trainer, batches, warm)
            r = timed(trainer.train_step, batches, self.device, warmup=warm, steps=a.steps, seconds=a.seconds)
            syncs = count_host_syncs(trainer.train_step, batches, self.device) if a.sync_check else None
            mem, mem_kind = _peak_mem_mb(self.device)
            ref = self.refs.get(case.key, {})
            row = {
                **base,
                **r,
                "peak_mem_mb": mem,
                "peak_mem_kind": mem_kind,
                "mfu": self._mfu(r["img_s"], case.model, case.image_size, source.num_classes),
                "host_syncs_per_step": None if syncs is None else syncs / 3,
                **{f"ratio_vs_ref_{k}": r["img_s"] / v for k, v in ref.items()},
            }
            if ref:
                row["ratio_vs_best_ref"] = r["img_s"] / max(ref.values())
            del trainer, source
            return self.emit(row)
        except Exception as e:  # noqa: BLE001
            if a.probe_dir:
                (Path(a.probe_dir) / f"failed-{a.probe_slot}").write_text(f"{type(e).__name__}: {e}")
            return self.emit({**base, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})

    def pipeline(self, case: Case) -> None:
        """The data source alone: batches/s with nothing else on the device."""
        a = self.args
        base = {
            "kind": "pipeline",
            "model": "",
            "batch": case.batch,
            "image_size": case.image_size,
            "data": case.data,
            "augment": case.augment,
        }
        try:
            source = build_data(case, a, self.device)
            batches = Endless(source)
            r = timed(lambda x, y: None, batches, self.device, warmup=a.warmup, steps=a.steps, seconds=a.seconds)
            r.pop("data_wait_share")
            self.emit({**base, **r, "source": type(source).__name__, "threads": a.threads, "prefetch": a.prefetch})
        except Exception as e:  # noqa: BLE001
            self.emit({**base, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})

    # -- the CIFAR probe: several processes on one GPU, each alone and then all together -------------------
    def _probe(self, case: Case, base: dict[str, Any], trainer, batches, warm: int) -> dict[str, Any]:
        a = self.args
        d = Path(a.probe_dir)
        startup_s = time.time() - PROCESS_START
        t0 = _now()
        for _ in range(warm):
            trainer.train_step(*next(batches))
        _sync(self.device)
        trainer.evaluate()  # compiles the evaluation graph too
        _sync(self.device)
        warm_s = _now() - t0
        t = _now()
        trainer.evaluate()
        eval_s = _now() - t
        (d / f"ready-{a.probe_slot}").write_text(str(time.time()))
        deadline = time.time() + a.probe_timeout
        while len(list(d.glob("ready-*"))) < a.probe_slots:
            if failed := sorted(d.glob("failed-*")):
                raise RuntimeError(
                    f"probe process {failed[0].name.removeprefix('failed-')} failed "
                    f"({failed[0].read_text()[:200]}); the timetable cannot be kept"
                )
            if time.time() > deadline:
                raise TimeoutError(
                    f"only {len(list(d.glob('ready-*')))} of {a.probe_slots} probe processes got "
                    f"ready within {a.probe_timeout} s"
                )
            time.sleep(0.05)
        # Every process derives the same timetable from the files' contents: slot i alone, then all.
        start = max(float(p.read_text()) for p in d.glob("ready-*")) + 1.0
        slot = a.probe_seconds

        def window(lo: float, hi: float) -> float:
            while time.time() < lo:
                time.sleep(0.005)
            n, t = 0, _now()
            while time.time() < hi - 0.25 * slot or n == 0:
                trainer.train_step(*next(batches))
                n += 1
                if n % 8 == 0:
                    _sync(self.device)
            _sync(self.device)
            return n / (_now() - t)

        alone = window(start + a.probe_slot * slot, start + (a.probe_slot + 1) * slot)
        together = window(start + a.probe_slots * slot, start + (a.probe_slots + 1) * slot)
        mem, mem_kind = _peak_mem_mb(self.device)
        max_steps = a.probe_max_steps or (case.cfg.schedule.max_steps if case.cfg else 0)
        return self.emit(
            {
                **base,
                "probe_slot": a.probe_slot,
                "probe_slots": a.probe_slots,
                "alone_steps_s": alone,
                "together_steps_s": together,
                "warmup_and_compile_s": warm_s,
                "startup_s": startup_s,
                "eval_s": eval_s,
                "steps_per_epoch": len(trainer.train_source),
                "eval_every": case.cfg.eval_every if case.cfg else 1,
                "max_steps": max_steps,
                "peak_mem_mb": mem,
                "peak_mem_kind": mem_kind,
            }
        )


# -- the summary table --------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    """A short fixed-width table of a results file (the last thing the GPU script prints)."""
    out = [
        f"{'kind':<10} {'model':<16} {'batch':>5} {'data':<22} {'compile':<10} {'img/s':>9} {'ms/step':>8} "
        f"{'wait':>6} {'MFU':>6} {'memMB':>7} {'xRef':>6}  note"
    ]
    for r in rows:
        if r.get("kind") == "matmul_peak":
            out.append(
                f"matmul peak {r['dtype']} n={r['n']}: {r['tflops']:.3g} TFLOP/s on {r.get('device_name')}"
                f" (torch {r.get('torch')}, DeepSpeed {r.get('deepspeed')}, DALI {r.get('dali')})"
            )
            continue
        data = str(r.get("data", ""))
        data = data if len(data) <= 22 else "…" + data[-21:]
        if r.get("augment") and r.get("kind") in ("deepspeed", "pipeline"):
            data = (data[:17] + "/" + r["augment"]) if len(data) + len(r["augment"]) > 21 else f"{data}/{r['augment']}"
        mode = {"reduce-overhead": "+cg", "max-autotune": "+ma", "max-autotune-no-cudagraphs": "+ma"}
        comp = f"{r.get('compile', '')}{mode.get(r.get('compile_mode') or '', '')}"
        if "error" in r:
            out.append(
                f"{r.get('kind', ''):<10} {r.get('model', ''):<16} {r.get('batch', ''):>5} {data:<22} "
                f"{comp:<10} FAILED: {r['error'][:90]}"
            )
            continue
        if "alone_steps_s" in r:
            out.append(
                f"{'probe':<10} {r.get('model', ''):<16} {r.get('batch', ''):>5} {data:<22} "
                f"{comp:<10} alone {r['alone_steps_s']:.1f} steps/s, together "
                f"{r['together_steps_s']:.1f} steps/s, warm-up {r['warmup_and_compile_s']:.0f} s"
            )
            continue

        def f(key: str, fmt: str, scale: float = 1.0, r: dict = r) -> str:
            v = r.get(key)
            return format(v * scale, fmt) if isinstance(v, (int, float)) else "-"

        ratio = r.get("ratio_vs_ref_compiled", r.get("ratio_vs_ref_eager"))
        note = []
        if "ratio_vs_ref_eager" in r and "ratio_vs_ref_compiled" in r:
            note.append(f"x{r['ratio_vs_ref_eager']:.2f} vs eager ref")
        if r.get("host_syncs_per_step") is not None:
            note.append(f"{r['host_syncs_per_step']:.1f} host syncs/step")
        if r.get("epoch_starts"):
            note.append(
                f"in-epoch {r['img_s_in_epoch']:.0f} img/s"
                + (f" wait {100 * r['data_wait_share_in_epoch']:.0f}%" if r.get("kind") != "pipeline" else "")
                + f"; {r['epoch_starts']} epoch starts of {r['epoch_start_s']:.2f} s; ImageNet-sized epochs "
                f"{r['img_s_imagenet_epoch']:.0f} img/s"
            )
        if r.get("kind") == "pipeline":
            note.append(f"{r.get('threads')} threads")
        out.append(
            f"{r.get('kind', ''):<10} {r.get('model', ''):<16} {r.get('batch', ''):>5} {data:<22} "
            f"{comp:<10} {f('img_s', '9.0f')} {f('step_ms', '8.2f')} "
            f"{f('data_wait_share', '5.1f', 100)}% {f('mfu', '5.1f', 100)}% {f('peak_mem_mb', '7.0f')} "
            f"{format(ratio, '6.2f') if ratio else '     -'}  {'; '.join(note)}"
        )
    out.append(
        "compile: engine = DeepSpeed's engine.compile(), module = compiled in place before deepspeed.initialize, "
        "+cg = mode reduce-overhead (CUDA graphs); xRef = img/s / the compiled reference of the same run "
        "(the eager one where none); wait = share of wall time spent waiting for data"
    )
    return "\n".join(out)


def targets(rows: list[dict[str, Any]]) -> str:
    """Issue 7's targets, each read from rows of the same run."""
    ok = [r for r in rows if "error" not in r and r.get("img_s")]

    def best(**match: Any) -> dict[str, Any] | None:
        found = [r for r in ok if all(m(r.get(k)) if callable(m) else r.get(k) == m for k, m in match.items())]
        return max(found, key=lambda r: r["img_s"]) if found else None

    def refs(model: str) -> dict[str, float]:
        return {r["compile"]: r["img_s"] for r in ok if r.get("kind") == "reference" and r.get("model") == model}

    is_dali = lambda d: isinstance(d, str) and (d.startswith("folder:") or d.startswith("s3://"))  # noqa: E731
    lines = ["targets:"]

    def verdict(good: bool | None) -> str:
        return "n/a " if good is None else ("MET " if good else "MISS")

    for model, aim in (("resnet50", 6000), ("resnet152", 2000)):
        ds = best(kind="deepspeed", model=model, data=is_dali)
        ref = refs(model)
        if ds is None or not ref:
            lines.append(f"  n/a  {model}: no DALI-fed DeepSpeed row and reference in this run")
            continue
        which = "compiled" if "compiled" in ref else "eager"
        ratio = ds["img_s"] / ref[which]
        lines.append(
            f"  {verdict(ratio >= 1.0)} {model} DALI+DeepSpeed ({ds['compile']}) {ds['img_s']:.0f} img/s = "
            f"{ratio:.2f} x the {which} plain-PyTorch reference ({ref[which]:.0f} img/s); target >= 1.0, "
            f"aim {aim} img/s; data wait {100 * ds['data_wait_share']:.1f}%"
        )
        if ds.get("epoch_starts"):
            big = ds["img_s_imagenet_epoch"] / ref[which]
            lines.append(
                f"  {verdict(big >= 1.0)}   with ImageNet-sized epochs (this set starts an epoch every "
                f"{ds['steps'] / ds['epoch_starts']:.0f} steps, {ds['epoch_start_s']:.2f} s each): "
                f"{ds['img_s_imagenet_epoch']:.0f} img/s = {big:.2f} x; within epochs "
                f"{ds['img_s_in_epoch']:.0f} img/s, data wait {100 * ds['data_wait_share_in_epoch']:.1f}%"
            )
    for r in ok:
        if r.get("kind") == "deepspeed" and is_dali(r.get("data")) and r.get("model") in ("resnet50", "resnet152"):
            lines.append(
                f"  {verdict(r['data_wait_share'] < 0.02)} data wait {100 * r['data_wait_share']:.2f}% < 2%: "
                f"{r['model']} compile={r['compile']}"
            )
    r50 = best(kind="deepspeed", model="resnet50", data=is_dali)
    pipe = best(kind="pipeline", augment=r50.get("augment")) if r50 else best(kind="pipeline")
    if pipe and r50:
        x = pipe["img_s"] / r50["img_s"]
        aug = f" ({pipe['augment']} augmentation)" if pipe.get("augment") else ""
        lines.append(
            f"  {verdict(x >= 3)} DALI pipeline alone{aug} {pipe['img_s']:.0f} img/s = {x:.1f} x what ResNet-50 "
            f"consumes ({r50['img_s']:.0f} img/s); target >= 3"
        )
        if pipe.get("epoch_starts") and r50.get("epoch_starts"):
            y = pipe["img_s_imagenet_epoch"] / r50["img_s_imagenet_epoch"]
            lines.append(
                f"  {verdict(y >= 3)}   with ImageNet-sized epochs: {pipe['img_s_imagenet_epoch']:.0f} img/s = "
                f"{y:.1f} x ({r50['img_s_imagenet_epoch']:.0f} img/s)"
            )
    r18 = best(kind="deepspeed", model="resnet18", data=is_dali)
    r18s = best(kind="deepspeed", model="resnet18", data="synthetic")
    ref18 = refs("resnet18")
    if r18 and ref18:
        ref = max(ref18.values())
        bound = []
        if r18s:
            bound.append(f"DeepSpeed on synthetic data {r18s['img_s']:.0f} img/s ({r18s['img_s'] / ref:.2f} x)")
        if pipe:
            bound.append(f"DALI alone {pipe['img_s']:.0f} img/s")
        bound.append(f"data wait {100 * r18['data_wait_share']:.0f}%")
        lines.append(
            f"  info ResNet-18 DALI+DeepSpeed {r18['img_s']:.0f} img/s = {r18['img_s'] / ref:.2f} x the reference "
            f"({ref:.0f} img/s); bounds: {'; '.join(bound)}"
        )
    syncs = [r for r in ok if r.get("host_syncs_per_step") is not None]
    for r in syncs:
        lines.append(
            f"  {verdict(r['host_syncs_per_step'] == 0)} host syncs in the step: "
            f"{r['host_syncs_per_step']:.1f} per step ({r['model']}, {r['data']}, compile={r['compile']})"
        )
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="resnet50:256",
        help="comma-separated name:batch (batch per step); e.g. resnet50:256,resnet152:128",
    )
    p.add_argument("--image-size", type=int, default=0, help="crop size; default 224 (ImageNet nets), 32 (CIFAR)")
    p.add_argument("--data", default="synthetic", help="comma-separated: synthetic, folder:DIR, s3://bucket/prefix")
    p.add_argument(
        "--compile",
        default="off",
        help="comma-separated DeepSpeed-path compile modes: off, module, engine, auto (model.compile)",
    )
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for every compiled run")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument(
        "--augment",
        default="paper",
        help="comma-separated ImageNet augmentations of the DALI "
        "sources: paper (configs/imagenet), rrc (configs/imagenet/modern)",
    )
    p.add_argument("--reference", default="eager", help="comma-separated: eager, compiled, none")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--channels-last", default="auto", type=lambda s: s if s == "auto" else s.lower() == "true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--decoder", default="auto", choices=["auto", "cpu", "mixed"])
    p.add_argument("--threads", type=int, default=8, help="DALI CPU threads")
    p.add_argument("--prefetch", type=int, default=3, help="DALI prefetch queue depth")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (cudnn.benchmark, DALI buffers)")
    p.add_argument("--compile-warmup", type=int, default=5, help="extra warm-up steps when compiled")
    p.add_argument("--steps", type=int, default=30, help="timed steps (at least)")
    p.add_argument("--seconds", type=float, default=0.0, help="time at least this long")
    p.add_argument("--pipeline-only", action="store_true", help="time the data sources alone, no model")
    p.add_argument("--no-matmul", action="store_true", help="skip the matmul peak (no MFU)")
    p.add_argument("--matmul-size", type=int, default=0)
    p.add_argument("--sync-check", action="store_true", help="count torch's host syncs in 3 steps (CUDA)")
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL", ""))
    p.add_argument("--config", help="benchmark this training config (its data, model and fast-path settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for --config")
    p.add_argument("--out", help="append the JSON lines to this file too")
    p.add_argument("--table", help="print the summary table of a results file and exit")
    p.add_argument("--targets", action="store_true", help="with --table: also Issue 7's targets")
    p.add_argument("--probe-dir", help="CIFAR probe: shared folder for the timetable of --probe-slots processes")
    p.add_argument("--probe-slot", type=int, default=0)
    p.add_argument("--probe-slots", type=int, default=1)
    p.add_argument("--probe-seconds", type=float, default=4.0, help="length of each probe window")
    p.add_argument("--probe-timeout", type=float, default=300.0, help="longest wait for the other processes")
    p.add_argument("--probe-max-steps", type=int, default=0, help="steps the full run will take (default: config)")
    return p.parse_args(argv)


def _cases(args: argparse.Namespace) -> list[Case]:
    if args.config:
        cfg = load_config(args.config, [f"--{s}" for s in args.set])
        size = cfg.data.image_size
        data = f"{cfg.data.source}{'/in-memory' if cfg.data.in_memory else ''}"
        return [
            Case(
                cfg.model.name,
                cfg.data.batch_size,
                size,
                data,
                compile=cfg.model.compile,
                cfg=cfg,
                extra={"config": args.config, "name": cfg.name},
            )
        ]
    cases = []
    for item in args.model.split(","):
        name, _, batch = item.partition(":")
        size = args.image_size or (32 if name.startswith("cifar_") else 224)
        for data in args.data.split(","):
            for augment in args.augment.split(",") if data != "synthetic" else ["paper"]:
                for mode in args.compile.split(","):
                    cases.append(Case(name, int(batch or 256), size, data, compile=mode, augment=augment))
    return cases


def start(args: argparse.Namespace) -> tuple[torch.device, DistEnv | None]:
    """The device the cases run on, and the process group (None with --pipeline-only: no engine)."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: read_env picks CUDA whenever it sees a GPU
    dist_env = None
    if args.pipeline_only:
        # No engine, so no process group (and no DeepSpeed start-up).
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dist_env = init_distributed(DistributedConfig())
        device = dist_env.device
    import torch._dynamo as dynamo  # heavy: only a run that compiles needs it

    # One process compiles several engines of one network (reference, module, engine); the default limit
    # of 8 graphs per code object would silently send later ones back to eager.
    for limit in ("recompile_limit", "cache_size_limit"):  # the newer name, and the older one of torch <= 2.5
        if hasattr(dynamo.config, limit):
            setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 64))
    return device, dist_env


def measure_pipelines(bench: Bench, cases: list[Case]) -> None:
    """--pipeline-only: each distinct data pipeline once (the cases that differ only in compile mode share one)."""
    seen = set()
    for c in cases:
        if (c.data, c.batch, c.image_size, c.augment) not in seen:
            seen.add((c.data, c.batch, c.image_size, c.augment))
            bench.pipeline(c)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(table(rows))
        if args.targets:
            print(targets(rows))
        return 0
    device, dist_env = start(args)
    if args.device == "cuda" and device.type != "cuda":
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    bench = Bench(args, device, dist_env)
    cases = _cases(args)
    if not args.no_matmul and not args.pipeline_only and not args.probe_dir:
        bench.matmul()
    if args.pipeline_only:
        measure_pipelines(bench, cases)
        return 0
    refs = [r for r in args.reference.split(",") if r and r != "none"]
    if not args.probe_dir:
        done = set()
        for c in cases:
            if c.key in done:
                continue
            done.add(c.key)
            for r in refs:
                bench.reference(c, compiled=(r == "compiled"))
    for c in cases:
        bench.deepspeed(c)
    failed = [r for r in bench.rows if "error" in r]
    if not args.probe_dir and len(bench.rows) > 1:
        print(table(bench.rows), file=sys.stderr)
    return 1 if failed and len(failed) == len([r for r in bench.rows if r.get("kind") != "matmul_peak"]) else 0


if __name__ == "__main__":
    sys.exit(main())
