"""System metrics: MLflow's own monitor, per node, through the tracker's sender, against a real ``mlflow server``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tiny import TINY

from pipeline.config import ConfigError, TrackingConfig
from pipeline.tracking import build_tracker

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What MLflow's SystemMetricsMonitor writes on any machine (GPU keys only where NVML finds a GPU).
MLFLOW_NAMES = {
    "cpu_utilization_percentage",
    "system_memory_usage_megabytes",
    "system_memory_usage_percentage",
    "disk_usage_percentage",
    "disk_usage_megabytes",
    "disk_available_megabytes",
    "network_receive_megabytes",
    "network_transmit_megabytes",
}


def _system_keys(client: MlflowClient, run_id: str) -> set[str]:
    return {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}


def _cfg(uri: str, **kw: object) -> TrackingConfig:
    kw.setdefault("experiment", "sysmetrics")
    return TrackingConfig(uri=uri, flush_interval_s=0.2, system_metrics_interval_s=0.5, **kw)  # type: ignore[arg-type]


def test_rank0_logs_mlflow_system_metrics_with_its_node_id(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    tracker = build_tracker(_cfg(mlflow_server.uri), is_main=True, node_id=0, run_name="sys")
    run_id = tracker.start(None)
    time.sleep(2.0)
    t0 = time.monotonic()
    tracker.finish("FINISHED")
    assert time.monotonic() - t0 < 5
    assert {f"system/node_0/{k}" for k in MLFLOW_NAMES} <= _system_keys(client, run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "system/node_0/cpu_utilization_percentage")]
    # One step per sampling period, counted from the run's start.
    assert len(steps) >= 2 and steps[0] <= 1 and steps == list(range(steps[0], steps[0] + len(steps))), steps
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]  # stopped


def test_a_run_shorter_than_one_period_still_records_its_system_metrics(mlflow_server) -> None:
    """MLflow's monitor drops the last, partial period; a run shorter than the interval would show none."""
    client = MlflowClient(mlflow_server.uri)
    cfg = TrackingConfig(
        uri=mlflow_server.uri, experiment="sysmetrics", flush_interval_s=0.2, system_metrics_interval_s=30
    )
    tracker = build_tracker(cfg, is_main=True, node_id=0, run_name="short")
    run_id = tracker.start(None)
    time.sleep(0.5)
    t0 = time.monotonic()
    tracker.finish("FINISHED")
    assert time.monotonic() - t0 < 5
    assert {f"system/node_0/{k}" for k in MLFLOW_NAMES} <= _system_keys(client, run_id)


def test_system_metrics_survive_an_outage_and_finish_never_hangs(mlflow_server) -> None:
    """MLflow's stock monitor stops for good at the first failed request; ours samples on, and what it took
    while the server was away arrives after the restart."""
    client = MlflowClient(mlflow_server.uri)
    tracker = build_tracker(_cfg(mlflow_server.uri), is_main=True, node_id=3, run_name="sys-outage")
    run_id = tracker.start(None)
    key = "system/node_3/cpu_utilization_percentage"
    assert tracker.sender.flush(10)
    mlflow_server.stop(kill=True)
    time.sleep(2.0)
    mlflow_server.start()
    time.sleep(1.0)
    tracker.finish("FINISHED")
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert len(steps) >= 5 and steps == sorted(set(steps)), steps

    # Unreachable for good: finish gives up after tracking.finish_timeout_s, the monitor after a few seconds.
    tracker = build_tracker(_cfg(mlflow_server.uri, finish_timeout_s=1.0), is_main=True, run_name="sys-gone")
    tracker.start(None)
    mlflow_server.stop(kill=True)
    time.sleep(1.0)
    t0 = time.monotonic()
    tracker.finish("FINISHED")
    assert time.monotonic() - t0 < 8


def test_resumed_run_continues_system_metric_steps(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    first = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="sys-resume")
    run_id = first.start(None)
    time.sleep(1.5)
    first.finish("KILLED")
    key = "system/node_0/system_memory_usage_megabytes"
    before = [m.step for m in client.get_metric_history(run_id, key)]
    assert before
    second = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="sys-resume")
    assert second.start(run_id) == run_id
    time.sleep(1.5)
    second.finish("FINISHED")
    after = [m.step for m in client.get_metric_history(run_id, key)]
    assert after[: len(before)] == before and len(after) > len(before) and after == sorted(set(after)), after


def test_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        TrackingConfig(system_metrics_interval_s=0)


@pytest.mark.slow
def test_two_process_run_logs_node_system_metrics_once(mlflow_server, tmp_path: Path) -> None:
    """torchrun with two ranks on one node: the node's local rank 0 samples, under MLflow's names."""
    import os

    from mlflow_server import free_port

    args = [
        "--config",
        str(REPO / "configs/cpu/digits_resnet20.toml"),
        *TINY,
        f"--data.cache_dir={REPO / '.cache/datasets'}",
        f"--checkpoint.uri={tmp_path / 'ckpt'}",
        f"--output_dir={tmp_path / 'runs/{name}'}",
        f"--tracking.uri={mlflow_server.uri}",
        "--tracking.experiment=sys-e2e",
        "--tracking.system_metrics_interval_s=1",
        "--tracking.log_model=false",
        "--name=sys2",
    ]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    res = subprocess.run(
        [*cmd, str(REPO / "pipeline/train.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sys-e2e").experiment_id])
    keys = _system_keys(client, run.info.run_id)
    assert {f"system/node_0/{k}" for k in MLFLOW_NAMES} <= keys, sorted(keys)
    assert {k.split("/")[1] for k in keys} == {"node_0"}  # one node: local rank 1 samples nothing
