"""Start-up checks (pipeline.runtime.preflight): a wrong store, tracking URI, dataset root or GPU count fails in seconds,
before any model, engine or DALI pipeline is built, with one line naming the thing and the fix, and exit 2."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_train import torchrun

from pipeline.config import load_config
from pipeline.core.distributed import DistEnv
from pipeline.runtime.preflight import (
    PreflightError,
    check_run,
    data_problem,
    gpu_problem,
    storage_problem,
    tracking_problem,
)
from pipeline.runtime.progress import unwrap_lines

ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIG = "configs/cpu/digits_resnet20.toml"


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        ROOT / CPU_CONFIG,
        [f"--output_dir={tmp_path}/run", f"--checkpoint.uri={tmp_path}/ckpt", "--tracking.enabled=false", *overrides],
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        full.pop(k, None)
    return full


def _train(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m pipeline.train`` on the CPU config, one process; returns the result and its wall time."""
    full = _env(env)
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "--config",
            str(ROOT / CPU_CONFIG),
            f"--data.cache_dir={ROOT / '.cache/datasets'}",
            f"--output_dir={tmp_path}/run",
            "--progress=false",
            *args,
        ],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - t0
    r.stderr = unwrap_lines(r.stderr)  # long log lines joined back: a test reads a message whole
    return r, took


def _one_rank() -> DistEnv:
    return DistEnv(0, 1, 0, 1, 0, torch.device("cpu"), "gloo")


def _unused_url() -> str:
    from servers import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


@pytest.fixture
def web_server() -> Iterator[str]:
    """A web server on 127.0.0.1 that answers every request with a page: reachable, but not MLflow."""

    class Page(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b"<html><body>a wiki, not MLflow</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- GPUs ----------------------------------------------------------------------------------------------------
def test_more_processes_than_gpus_is_refused_with_the_fix():
    why = gpu_problem(device_type="cuda", local_world_size=8, device_count=2)
    assert "8 processes on this node" in why and "2 visible GPU(s)" in why
    assert "--nproc_per_node" in why and "CUDA_VISIBLE_DEVICES" in why
    assert gpu_problem(device_type="cuda", local_world_size=2, device_count=2) == ""
    assert gpu_problem(device_type="cuda", local_world_size=1, device_count=8) == ""
    assert gpu_problem(device_type="cpu", local_world_size=4, device_count=0) == ""  # CPU ranks share the cores


# -- checkpoint storage --------------------------------------------------------------------------------------
def test_missing_bucket_fails_within_10_s_of_start(tmp_path, s3_endpoint):
    """Issue 15: the bucket's absence was reported after ~3 minutes of start-up (engine build first)."""
    from s3_server import aws_env

    r, took = _train(
        tmp_path, "--checkpoint.uri=s3://missing-bucket/x", "--tracking.enabled=false", env=aws_env(s3_endpoint)
    )
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "checkpoint.uri = 's3://missing-bucket/x'" in lines[0], r.stderr[-3000:]
    assert "bucket 'missing-bucket' does not exist" in lines[0] and "create it or fix the URI" in lines[0]
    assert "Traceback" not in r.stderr and "global batch" not in r.stderr  # no engine, no run summary
    # 4-6 s here when the machine is idle; on a loaded machine the imports alone (torch, DeepSpeed) can
    # take longer than 10 s, so the bound is 10 s or the bare imports plus 4 s, whichever is larger.
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, deepspeed, pipeline.train"], check=True, env=_env())
    imports = time.monotonic() - t0
    assert took < max(10, imports + 4), f"{took:.1f} s from process start to the error ({imports:.1f} s of imports)"


def test_a_reachable_store_passes_and_an_unusable_one_names_the_uri(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    from s3_server import aws_env

    for k, v in aws_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    assert storage_problem(_cfg(tmp_path, f"--checkpoint.uri={s3_bucket}/ckpt")) == ""
    assert storage_problem(_cfg(tmp_path)) == ""  # a local folder, created
    (tmp_path / "a-file").write_text("x")
    why = storage_problem(_cfg(tmp_path, f"--checkpoint.uri={tmp_path}/a-file"))
    assert why.startswith(f"checkpoint.uri = '{tmp_path}/a-file' is a file, expected a folder"), why


# -- tracking ------------------------------------------------------------------------------------------------
def test_required_tracking_at_an_unreachable_uri_fails_at_start(tmp_path):
    url = _unused_url()
    r, took = _train(
        tmp_path,
        f"--checkpoint.uri={tmp_path}/ckpt",
        f"--tracking.uri={url}",
        "--tracking.required=true",
        "--tracking.start_timeout_s=5",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"tracking.uri = '{url}'" in lines[0], r.stderr[-3000:]
    assert "start the MLflow server" in lines[0] and "tracking.required = false" in lines[0]
    assert "global batch" not in r.stderr and took < 60


def test_tracking_problems_are_errors_only_when_required(tmp_path, web_server, caplog):
    url = _unused_url()
    why = tracking_problem(
        _cfg(tmp_path, "--tracking.enabled=true", f"--tracking.uri={url}", "--tracking.required=true")
    )
    assert why.startswith(f"tracking.uri = '{url}' cannot be used as an MLflow server"), why
    why = tracking_problem(
        _cfg(tmp_path, "--tracking.enabled=true", f"--tracking.uri={web_server}", "--tracking.required=true")
    )
    assert why.startswith(f"tracking.uri = '{web_server}' cannot be used as an MLflow server"), why
    # Not required: today's documented fallback (start untracked, buffer), with the way to make it an error.
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert tracking_problem(_cfg(tmp_path, "--tracking.enabled=true", f"--tracking.uri={url}")) == ""
    assert f"MLflow at {url}" in caplog.text and "set tracking.required = true to make this an error" in caplog.text
    assert tracking_problem(_cfg(tmp_path, f"--tracking.uri={url}", "--tracking.required=true")) == ""  # disabled


def test_a_real_mlflow_server_passes(tmp_path, mlflow_server):
    cfg = _cfg(tmp_path, "--tracking.enabled=true", f"--tracking.uri={mlflow_server.uri}", "--tracking.required=true")
    assert tracking_problem(cfg) == ""


def test_an_embedded_store_in_a_missing_folder_is_named(tmp_path):
    uri = f"sqlite:///{tmp_path}/nope/mlflow.db"
    why = tracking_problem(
        _cfg(tmp_path, "--tracking.enabled=true", f"--tracking.uri={uri}", "--tracking.required=true")
    )
    assert f"tracking.uri = '{uri}'" in why and f"{tmp_path}/nope" in why and "does not exist" in why
    assert (
        tracking_problem(_cfg(tmp_path, "--tracking.enabled=true", f"--tracking.uri=sqlite:///{tmp_path}/m.db")) == ""
    )


# -- dataset root --------------------------------------------------------------------------------------------
def test_a_dataset_root_that_is_a_file_says_so(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    why = data_problem(_cfg(tmp_path, "--data.source=folder", f"--data.root={tmp_path}/images.zip"))
    assert f"{tmp_path}/images.zip is a file, expected a folder" in why and "--data.root" in why, why
    assert "does not exist" in data_problem(_cfg(tmp_path, "--data.source=folder", f"--data.root={tmp_path}/nope"))
    assert data_problem(_cfg(tmp_path, "--data.source=folder", f"--data.root={tmp_path}")) == ""
    assert data_problem(_cfg(tmp_path)) == ""  # digits: generated by the data layer


# -- the verdict ---------------------------------------------------------------------------------------------
def test_every_problem_is_one_line_of_one_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    cfg = _cfg(tmp_path, f"--checkpoint.uri={tmp_path}/a-file", "--data.source=folder", f"--data.root={tmp_path}/no")
    with pytest.raises(PreflightError) as e:
        check_run(cfg, env=_one_rank())
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("start-up check failed: ") for line in lines), lines
    assert "checkpoint.uri" in lines[0] and "dataset root" in lines[1]
    check_run(_cfg(tmp_path), env=_one_rank())  # a good config passes
    # No checkpointing (the throughput benchmark): checkpoint.uri is never touched.
    check_run(_cfg(tmp_path, f"--checkpoint.uri={tmp_path}/a-file"), env=_one_rank(), checkpointing=False)


@pytest.mark.slow
def test_two_ranks_fail_together_without_waiting(tmp_path, s3_endpoint):
    """Only rank 0 asks the store; rank 1 receives the verdict and exits 2 too, instead of waiting in the next
    collective for the timeout."""
    from s3_server import aws_env

    t0 = time.monotonic()
    r = torchrun(
        [
            str(ROOT / "pipeline/train.py"),
            "--config",
            str(ROOT / CPU_CONFIG),
            f"--data.cache_dir={ROOT / '.cache/datasets'}",
            f"--output_dir={tmp_path}/run",
            "--checkpoint.uri=s3://missing-bucket/x",
            "--tracking.enabled=false",
            "--distributed.timeout_s=300",
        ],
        cwd=tmp_path,
        timeout=300,
        env=aws_env(s3_endpoint),
    )
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert r.stderr.count("start-up check failed: checkpoint.uri = 's3://missing-bucket/x'") == 1, r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr, r.stderr[-3000:]  # torchrun's summary: a rank ended with the config code
    assert took < 120, f"{took:.0f} s: a rank waited for the collective timeout"
