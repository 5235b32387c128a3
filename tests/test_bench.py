"""The GPU fast path's switches and the benchmarks, on the CPU: resolution of "auto", engine options that
must not change a number, the throughput benchmark end to end at toy sizes, the JPEG writer, the
summary table, the CIFAR probe's projection, the concurrent study launcher with its MLflow import, and the FC
curvature at initialisation that explains why deep CIFAR ResNets spike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runtime.engine import FastPath, resolve_fast_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import fc_curvature  # noqa: E402
import make_jpegs  # noqa: E402
import study_parallel  # noqa: E402
import throughput  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
    ENV.pop(_k, None)


def run_py(args: list[str], *, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


# -- the fast path's "auto" ----------------------------------------------------------------------------------
def test_auto_is_the_fast_path_on_cuda_and_the_plain_one_on_cpu():
    cpu = resolve_fast_path(device="cpu")
    assert cpu == FastPath(
        dtype="fp32",
        channels_last=False,
        compile="off",
        compile_mode="default",
        compile_backend="inductor",
        fused_sgd=False,
        cudnn_benchmark=False,
    )
    gpu = resolve_fast_path(device="cuda:0")
    assert (gpu.dtype, gpu.channels_last, gpu.compile, gpu.fused_sgd, gpu.cudnn_benchmark) == (
        "bf16",
        True,
        "engine",
        True,
        True,
    )
    explicit = resolve_fast_path(
        device="cuda",
        dtype="fp32",
        channels_last=False,
        compile="module",
        fused=False,
        cudnn_benchmark=False,
        compile_mode="reduce-overhead",
    )
    assert (explicit.dtype, explicit.channels_last, explicit.compile, explicit.fused_sgd) == (
        "fp32",
        False,
        "module",
        False,
    )
    assert explicit.compile_kwargs() == {"dynamic": False, "mode": "reduce-overhead"}
    assert gpu.compile_kwargs() == {"dynamic": False}
    assert resolve_fast_path(device="cpu", cudnn_benchmark=True).cudnn_benchmark is False, "cuDNN is CUDA's"
    assert gpu.as_params()["fast.compile"] == "engine"
    with pytest.raises(ValueError, match="model.compile"):
        resolve_fast_path(device="cpu", compile="jit")


def test_fast_path_config_keys_default_to_auto_and_validate():
    cfg = load_config(None, [])
    assert (
        cfg.model.channels_last,
        cfg.model.compile,
        cfg.precision.dtype,
        cfg.precision.cudnn_benchmark,
        cfg.optim.fused,
    ) == ("auto",) * 5
    cfg = load_config(
        None,
        [
            "--model.channels_last=true",
            "--model.compile=off",
            "--optim.fused=false",
            "--precision.cudnn_benchmark=false",
            "--model.compile_mode=reduce-overhead",
        ],
    )
    assert cfg.model.channels_last is True and cfg.optim.fused is False and cfg.model.compile == "off"
    with pytest.raises(ConfigError, match="expected bool or 'auto'"):
        load_config(None, ["--model.channels_last=on"])
    with pytest.raises(ConfigError, match="allowed values: 'auto', 'off', 'module', 'engine'"):
        load_config(None, ["--model.compile=jit"])
    with pytest.raises(ConfigError, match="root_sha256"):
        load_config(None, ["--data.root_sha256=abc"])


ENGINE_CHECK = r"""
import json, sys, torch, torch.nn.functional as F
from pipeline.config import DistributedConfig, OptimConfig, PrecisionConfig
from pipeline.core.distributed import init_distributed
init_distributed(DistributedConfig())
from pipeline.runtime.engine import build_engine
from pipeline.models import build_model

def engine(**kw):
    torch.manual_seed(0)
    return build_engine(build_model("cifar_resnet20", num_classes=10), optim=OptimConfig(),
                        precision=PrecisionConfig(dtype=kw.pop("dtype", "fp32")), distributed=DistributedConfig(),
                        lr=0.1, micro_batch=8, world_size=1, device=torch.device("cpu"), **kw)

def train(e, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        logits = e(x)
        e.backward(F.cross_entropy(logits.float(), y))
        e.step()
    return logits

out = {}
a = engine()
assert a.enable_backward_allreduce is False  # one rank: the identity all-reduce is skipped
out["clipping"] = a.gradient_clipping()  # DeepSpeed's default would be 1.0
out["throughput_timer"] = a.tput_timer.config.enabled  # it synchronises the device twice per step
b = engine()
b.enable_backward_allreduce = True
train(a); train(b)
out["allreduce_skip_identical"] = all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
keys = list(a.module.state_dict())
for mode in ("module", "engine"):
    c = engine(compile=mode, compile_backend="eager")
    train(c)
    out[f"{mode}_keys_same"] = list(c.module.state_dict()) == keys
    out[f"{mode}_close"] = all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a.module.parameters(), c.module.parameters()))
    out[f"{mode}_fast_path"] = c.fast_path.compile
d = engine(channels_last=True)
out["channels_last"] = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in d.module.parameters())
train(d, 1)
e = engine(dtype="bf16")
out["bf16_logits"] = str(train(e, 1).dtype)
out["bf16_master_weights"] = str(next(e.module.parameters()).dtype)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_engine_options_change_no_number_and_keep_checkpoint_keys():
    """Also: no hidden gradient clipping (DeepSpeed's default is 1.0) and no throughput-timer syncs."""
    r = run_py(["-c", ENGINE_CHECK], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["allreduce_skip_identical"], "skipping the one-rank all-reduce changed the weights"
    assert out["clipping"] == 0.0 and out["throughput_timer"] is False
    for mode in ("module", "engine"):
        assert out[f"{mode}_keys_same"], f"compile={mode} renamed the parameters (checkpoints would not load)"
        assert out[f"{mode}_close"] and out[f"{mode}_fast_path"] == mode
    assert out["channels_last"]
    assert out["bf16_logits"] == "torch.bfloat16" and out["bf16_master_weights"] == "torch.float32"


# -- the throughput benchmark ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_jpegs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jpegs")
    assert (
        make_jpegs.main(
            [
                str(out),
                "--count",
                "12",
                "--classes",
                "3",
                "--min-side",
                "40",
                "--max-side",
                "56",
                "--target-kib",
                "3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return out


def test_throughput_benchmark_runs_the_real_step_on_the_cpu(tmp_path, tiny_jpegs):
    res = tmp_path / "res.jsonl"
    r = run_py(
        [
            "benchmarks/throughput.py",
            "--device",
            "cpu",
            "--model",
            "cifar_resnet20:4",
            "--num-classes",
            "10",
            "--image-size",
            "32",
            "--data",
            f"synthetic,folder:{tiny_jpegs}",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--threads",
            "1",
            "--augment",
            "rrc",
            "--reference",
            "eager",
            "--matmul-size",
            "128",
            "--out",
            str(res),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["matmul_peak", "reference", "deepspeed", "deepspeed"]
    assert rows[0]["tflops"] > 0 and rows[0]["dtype"] == "float32" and rows[0]["torch"]
    for row in rows[1:]:
        assert "error" not in row, row.get("trace")
        assert row["img_s"] > 0 and row["step_ms"] > 0 and row["steps"] >= 2 and row["peak_mem_mb"] > 0
        assert row["mfu"] > 0 and 0 <= row["data_wait_share"] < 1
    synthetic, folder = rows[2], rows[3]
    assert synthetic["source"] == "SyntheticSource" and folder["source"] == "DaliSource"
    assert folder["ratio_vs_ref_eager"] == pytest.approx(folder["img_s"] / rows[1]["img_s"])
    assert (folder["dtype"], folder["compile"], folder["channels_last"]) == ("fp32", "off", False)
    t = run_py(["benchmarks/throughput.py", "--table", str(res), "--targets"])
    assert t.returncode == 0 and "cifar_resnet20" in t.stdout and "targets:" in t.stdout


@pytest.mark.slow
def test_dali_pipeline_alone_from_a_folder_and_from_s3(tmp_path, tiny_jpegs, s3_endpoint):
    import s3fs
    from s3_server import aws_env

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    fs.mkdir("bench")
    for f in sorted((tiny_jpegs / "train").rglob("*.jpg")):
        fs.put(str(f), f"bench/ds/train/{f.parent.name}/{f.name}")
    res = tmp_path / "res.jsonl"
    env = {**ENV, **aws_env(s3_endpoint), "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/throughput.py",
            "--device",
            "cpu",
            "--model",
            "resnet18:4",
            "--image-size",
            "32",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--threads",
            "1",
            "--augment",
            "rrc,paper",
            "--data",
            f"s3://bench/ds,folder:{tiny_jpegs}",
            "--pipeline-only",
            "--out",
            str(res),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert [(r["kind"], r["data"], r["augment"]) for r in rows] == [
        ("pipeline", "s3://bench/ds", "rrc"),
        ("pipeline", "s3://bench/ds", "paper"),
        ("pipeline", f"folder:{tiny_jpegs}", "rrc"),
        ("pipeline", f"folder:{tiny_jpegs}", "paper"),
    ]
    assert all("error" not in r and r["img_s"] > 0 and r["source"] == "DaliSource" for r in rows), rows


def test_summary_table_and_targets_read_one_run():
    rows = [
        {"kind": "matmul_peak", "dtype": "bfloat16", "n": 8192, "tflops": 700.0, "device_name": "H100"},
        {
            "kind": "reference",
            "model": "resnet50",
            "batch": 256,
            "data": "synthetic",
            "compile": "eager",
            "img_s": 4000.0,
        },
        {
            "kind": "reference",
            "model": "resnet50",
            "batch": 256,
            "data": "synthetic",
            "compile": "compiled",
            "img_s": 5600.0,
        },
        {
            "kind": "deepspeed",
            "model": "resnet50",
            "batch": 256,
            "data": "folder:/tmp/j",
            "compile": "engine",
            "img_s": 5800.0,
            "data_wait_share": 0.01,
            "step_ms": 44.0,
            "host_syncs_per_step": 0.0,
            "ratio_vs_ref_compiled": 5800 / 5600,
            "ratio_vs_ref_eager": 1.45,
            "steps": 40,
            "epoch_starts": 2,
            "epoch_start_s": 1.5,
            "img_s_in_epoch": 6100.0,
            "data_wait_share_in_epoch": 0.004,
            "img_s_imagenet_epoch": 6090.0,
        },
        {"kind": "pipeline", "batch": 256, "data": "folder:/tmp/j", "img_s": 15000.0, "threads": 12},
        {
            "kind": "deepspeed",
            "model": "resnet152",
            "batch": 128,
            "data": "folder:/tmp/j",
            "compile": "off",
            "error": "RuntimeError: boom",
        },
    ]
    text = throughput.table(rows)
    assert "FAILED: RuntimeError: boom" in text and "700 TFLOP/s" in text and "1.04" in text
    t = throughput.targets(rows)
    assert "MET  resnet50 DALI+DeepSpeed (engine) 5800 img/s = 1.04 x the compiled" in t
    assert "MISS DALI pipeline alone 15000 img/s = 2.6 x" in t
    assert "MET  host syncs in the step: 0.0" in t and "n/a  resnet152" in t
    assert "with ImageNet-sized epochs (this set starts an epoch every 20 steps, 1.50 s each): 6090 img/s = 1.09 x" in t
    assert "2 epoch starts of 1.50 s" in text


# -- the JPEG writer ---------------------------------------------------------------------------------------------
def test_jpegs_are_imagenet_shaped_deterministic_and_written_once(tmp_path):
    from PIL import Image

    kw = dict(seed=3, min_side=320, max_side=640, target_kib=95.0, quality=90)
    data = [make_jpegs.render(i, **kw) for i in range(4)]
    assert data[0] == make_jpegs.render(0, **kw)
    for blob in data:
        import io

        im = Image.open(io.BytesIO(blob))
        w, h = im.size
        assert im.format == "JPEG" and 320 <= w <= 640 and 320 <= h <= 640
        target = 95 * 1024 * w * h / make_jpegs.AVG_AREA
        assert 0.75 * target < len(blob) < 1.25 * target
    out = tmp_path / "j"
    args = [
        str(out),
        "--count",
        "6",
        "--classes",
        "2",
        "--min-side",
        "32",
        "--max-side",
        "48",
        "--target-kib",
        "2",
        "--workers",
        "1",
    ]
    assert make_jpegs.main(args) == 0
    files = sorted((out / "train").rglob("*.jpg"))
    assert len(files) == 6 and {f.parent.name for f in files} == {"c0000", "c0001"}
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert make_jpegs.main(args) == 0
    assert [f.stat().st_mtime_ns for f in files] == mtimes, "a complete set is not written again"


# -- the CIFAR probe's projection --------------------------------------------------------------------------------
def probe_row(name: str, alone: float, together: float, **kw) -> dict:
    return {
        "name": name,
        "alone_steps_s": alone,
        "together_steps_s": together,
        "eval_s": 0.1,
        "warmup_and_compile_s": 30.0,
        "steps_per_epoch": 390,
        "max_steps": 64000,
        "eval_every": 1,
        **kw,
    }


def test_projection_picks_the_faster_launch_and_refuses_over_the_limit(tmp_path, capsys):
    rows = [probe_row("a", 400, 200), probe_row("b", 200, 150)]
    p = study_parallel.project(rows, startup_s=10)
    # Concurrent: b's 64k steps at 150/s dominate; evaluations (165 each) at b's slowdown.
    assert p["concurrent_s"] == pytest.approx(10 + 30 + 64000 / 150 + 165 * 0.1 * 200 / 150)
    assert p["sequential_s"] == pytest.approx(2 * 40 + 64000 / 400 + 64000 / 200 + 2 * 165 * 0.1)
    assert p["best"] == "concurrent" and p["parallel"] == 2
    measured = study_parallel.project(
        [probe_row("a", 400, 200, startup_s=50.0), probe_row("b", 200, 150)], startup_s=10
    )
    assert measured["concurrent_s"] == pytest.approx(p["concurrent_s"] + 40), "the probe's own start-up counts"
    slow = [probe_row("a", 400, 100), probe_row("b", 400, 100)]
    assert study_parallel.project(slow)["parallel"] == 1
    f = tmp_path / "probe.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert study_parallel.main(["project", str(f), "--limit-s", "600"]) == 0
    assert study_parallel.main(["project", str(f), "--limit-s", "300"]) == 3
    f.write_text(json.dumps({"name": "a", "error": "RuntimeError: cudagraphs"}))
    assert study_parallel.main(["project", str(f)]) == 2
    assert "probe of a failed: RuntimeError: cudagraphs" in capsys.readouterr().out


# -- the concurrent study launcher ---------------------------------------------------------------------------------
DIGITS = [
    "--data.source=digits",
    "--data.val_dir=val",
    "--data.flip=false",
    "--data.val_batch_size=0",
    "--data.batch_size=32",
    "--data.num_threads=1",
    "--schedule.max_steps=4",
    "--schedule.milestones=[2]",
    "--log_every=2",
    "--progress=false",
    "--tracking.log_model=false",
    "--tracking.system_metrics=false",
    f"--data.cache_dir={REPO / '.cache/datasets'}",
]


@pytest.mark.slow
def test_members_train_concurrently_under_one_parent_and_report(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = run_py(
        [
            "benchmarks/study_parallel.py",
            "run",
            "configs/study/cifar10_table6.toml",
            "--parallel",
            "2",
            "--only",
            "plain20,resnet20",
            "--log-dir",
            str(tmp_path / "logs"),
            "--report",
            "--report-out",
            str(tmp_path / "report"),
            *DIGITS,
            f"--tracking.uri={uri}",
            f"--output_dir={tmp_path}/out/{{name}}",
            f"--checkpoint.uri={tmp_path}/ckpt",
        ],
        timeout=900,
    )
    assert r.returncode == 0, (
        r.stdout[-2000:] + r.stderr[-2000:] + "".join(p.read_text()[-1500:] for p in (tmp_path / "logs").glob("*.log"))
    )
    client = MlflowClient(uri)
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.study_role = 'parent'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [parents[0].info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["plain20", "resnet20"]
    assert all(c.info.status == "FINISHED" and "val_top1_error" in c.data.metrics for c in children)
    # Both started before either finished (their MLflow start times may not overlap: start-up can queue
    # on a shared lock, such as DeepSpeed building its CPU op).
    lines = [
        line.strip() for line in r.stdout.splitlines() if line.strip().startswith(("started", "plain20:", "resnet20:"))
    ]
    assert [line.split()[0] for line in lines[:2]] == ["started", "started"], r.stdout
    assert (tmp_path / "report" / "table.md").is_file()


def test_launcher_runs_n_at_a_time_with_own_ports_and_stops_at_the_deadline(tmp_path):
    report = (
        "import json, os, sys, time; print(json.dumps([os.environ['MASTER_PORT'], os.environ['RANK'], time.time()]))"
    )
    cmds = [
        (f"m{i}", [sys.executable, "-c", f"{report}; time.sleep({0.5 if i < 3 else 60})"], tmp_path / f"m{i}.log")
        for i in range(4)
    ]
    codes = study_parallel._launch(cmds[:3], parallel=2)
    assert codes == {"m0": 0, "m1": 0, "m2": 0}
    seen = [json.loads((tmp_path / f"m{i}.log").read_text()) for i in range(3)]
    assert len({port for port, _, _ in seen}) == 3 and all(rank == "0" for _, rank, _ in seen)
    assert seen[2][2] > min(seen[0][2], seen[1][2]), "the third waited for a free slot"
    t0 = time.monotonic()
    codes = study_parallel._launch([cmds[3], cmds[0]], parallel=1, deadline_s=1.0)
    assert codes["m3"] == -15 and codes["m0"] == -1 and time.monotonic() - t0 < 30, "stopped, and m0 not started"


def test_histories_import_as_the_study_runner_would_log_them(tmp_path):
    from mlflow import MlflowClient

    from pipeline.config import flatten
    from pipeline.study.runner import member_config, read_study

    study = read_study(REPO / "configs/study/cifar10_table6.toml")
    hist = tmp_path / "h"
    hist.mkdir()
    for m, err in (("plain20", 9.0), ("resnet20", 8.0)):
        cfg = member_config(study, next(x for x in study.members if x.name == m))
        rows = [{"step": s, "train_loss": 2.0 / s, "train_top1_error": 50.0 / s, "lr": 0.1} for s in (50, 100)]
        rows.append({"step": 100, "epoch": 1.0, "val_top1_error": err, "val_top5_error": 1.0, "val_loss": 0.5})
        from pipeline.models import model_spec

        (hist / f"{m}.json").write_text(
            json.dumps(
                {
                    "config": cfg.to_dict(),
                    "params": flatten(cfg),
                    "tags": {**model_spec(cfg.model.name).tags(), "model": cfg.model.name},
                    "history": rows,
                    "final_val": {"val_top1_error": err},
                    "exit_code": 0,
                    "start_time": 1.0e9,
                    "end_time": 1.0e9 + 60,
                }
            )
        )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        study_parallel.main(
            [
                "import",
                str(hist),
                str(REPO / "configs/study/cifar10_table6.toml"),
                "--tracking-uri",
                uri,
                "--report-out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    client = MlflowClient(uri)
    children = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.imported = 'true'"
    )
    assert {c.info.run_name: c.data.metrics["val_top1_error"] for c in children} == {"plain20": 9.0, "resnet20": 8.0}
    c = children[0]
    assert c.data.tags["study"] == "cifar10_table6" and c.data.tags["depth"] == "20"
    assert [m.step for m in client.get_metric_history(c.info.run_id, "train_loss")] == [50, 100]
    assert "| 20" in (tmp_path / "report" / "table.md").read_text()


# -- the data benchmark ----------------------------------------------------------------------------------------
def test_data_benchmark_measures_three_sources_behind_the_delay(tmp_path, tiny_jpegs):
    """benchmarks/data_throughput.py at toy size: local files, per-object S3 and sharded S3 in one run, behind
    the 20 ms proxy, with S3 requests counted by moto."""
    rows_file = tmp_path / "rows.jsonl"
    args = ["--jpegs", str(tiny_jpegs), "--images", "12", "--object-images", "12", "--epochs", "2", "--rounds", "1"]
    r = run_py(["benchmarks/data_throughput.py", *args, "--batch-size", "4", "--out", str(rows_file)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["source"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
    assert sorted(rows) == ["local", "s3-objects", "s3-shards"]
    for row in rows.values():
        assert row["images"] == 24 and row["img_per_s"] > 0 and len(row["epoch_gaps_ms"]) == 1
        assert row["delay_ms_each_way"] == 20.0 and "DALI" in row["versions"]
    assert "s3_requests" not in rows["local"]
    assert rows["s3-objects"]["requests_per_image"] >= 1.9  # DALI's file reader: a HEAD and a GET per image
    assert rows["s3-shards"]["requests_per_image_after_epoch1"] == 0  # a warm node cache asks S3 nothing
    assert "| s3-shards |" in r.stdout and "worst gap / median" in r.stdout


def test_data_benchmark_puts_mapped_files_beside_read_ones(tmp_path, tiny_jpegs):
    """--sources local,local-mmap: the local tree read as training reads it and with DALI mapping the files, in one
    run (the figure behind pipeline.data.pipelines.READER_IO); the reader setting is back as it was afterwards."""
    import importlib.util

    rows_file = tmp_path / "rows.jsonl"
    args = ["--jpegs", str(tiny_jpegs), "--images", "12", "--epochs", "2", "--rounds", "1", "--batch-size", "4"]
    r = run_py(["benchmarks/data_throughput.py", *args, "--sources", "local,local-mmap", "--out", str(rows_file)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["source"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
    assert sorted(rows) == ["local", "local-mmap"]
    assert all(row["images"] == 24 and row["img_per_s"] > 0 and "s3_requests" not in row for row in rows.values())
    assert "| local-mmap |" in r.stdout

    spec = importlib.util.spec_from_file_location("data_throughput", REPO / "benchmarks" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from pipeline.data import pipelines

    assert pipelines.READER_IO == {"dont_use_mmap": True}
    with bench.mapped_files(True):
        assert pipelines.READER_IO == {"dont_use_mmap": False}
    assert pipelines.READER_IO == {"dont_use_mmap": True}


# -- the FC curvature at initialisation ------------------------------------------------------------------------
def test_fc_curvature_is_the_top_eigenvalue_of_the_fc_layers_hessian():
    """benchmarks/fc_curvature.py's closed form against autograd's Hessian of the same loss in the FC parameters,
    and the effect it measures: a deeper ResNet whose BN scales start at 1 has the larger curvature."""
    import torch

    from pipeline.models import build_model

    torch.manual_seed(0)
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % 10
    model = build_model("cifar_resnet20")
    top, loss = fc_curvature.fc_hessian_top(model, images, labels, chunk=5)
    feats = fc_curvature.pooled_features(model, images, chunk=5)[0].double()  # the same batches as the closed form
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()

    def ce(flat):
        weight, bias = flat[: w.numel()].view_as(w), flat[w.numel() :]
        return torch.nn.functional.cross_entropy(feats @ weight.T + bias, labels)

    flat = torch.cat([w.flatten(), b])
    hessian = torch.autograd.functional.hessian(ce, flat)
    assert abs(loss - float(ce(flat))) < 1e-4
    assert abs(top - float(torch.linalg.eigvalsh(hessian)[-1])) < 1e-6 * max(1.0, top)
    torch.manual_seed(0)
    deeper, _ = fc_curvature.fc_hessian_top(build_model("cifar_resnet56"), images, labels, chunk=5)
    torch.manual_seed(0)
    small, _ = fc_curvature.fc_hessian_top(
        build_model("cifar_resnet56", bn_weight_init="uniform_residual"), images, labels, chunk=5
    )
    assert deeper > top and small < deeper / 2
