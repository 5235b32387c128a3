"""MLflow tracking against a real ``mlflow server``: what a run records, resume, outages.

The fast tests drive the tracker directly; the slow ones train the digits demo network for a few
steps (one process, or two "nodes" of one process each) and read back what the server holds.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from tiny import TINY

from pipeline.config import TrackingConfig, flatten, load_config
from pipeline.tracking import NullTracker, build_tracker

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cfg(uri: str, **kw: object) -> TrackingConfig:
    kw.setdefault("experiment", "unit")
    return TrackingConfig(uri=uri, flush_interval_s=0.2, system_metrics_interval_s=1.0, **kw)  # type: ignore[arg-type]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


# -- the tracker itself -----------------------------------------------------------------------------
def test_tracker_records_params_tags_metrics_artifacts_and_model(mlflow_server, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    parent = client.create_run(client.create_experiment("unit"), run_name="parent").info.run_id
    tracker = build_tracker(
        _cfg(mlflow_server.uri, study="s1", parent_run_id=parent), is_main=True, run_name="cfg-name"
    )
    run_id = tracker.start(None)
    assert run_id
    tracker.log_params({"model.name": "cifar_resnet20", "optim.lr": "0.1"})
    tracker.set_tags({"depth": "20", "residual": "true"})
    calls = 60
    for step in range(1, calls + 1):
        tracker.log_metrics(step, {"train_loss": 1.0 / step, "lr": 0.1})
    (tmp_path / "config.toml").write_text("name = 'x'\n")
    tracker.log_artifact(str(tmp_path / "config.toml"))
    tracker.log_model(torch.nn.Linear(4, 3))
    tracker.finish("FINISHED")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cfg-name"
    assert run.data.params == {"model.name": "cifar_resnet20", "optim.lr": "0.1"}
    tags = run.data.tags
    assert tags["depth"] == "20" and tags["residual"] == "true" and tags["study"] == "s1"
    assert tags["mlflow.parentRunId"] == parent
    assert tags["gpu_type"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    assert tags["git_commit"]
    assert _steps(client, run_id, "train_loss") == list(range(1, calls + 1))
    # Batched: far fewer requests than log_metrics calls.
    assert tracker.sender.batches_sent < calls / 4
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.toml"]
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run_id]


def test_resume_continues_the_same_run_without_duplicate_points(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    first = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="r")
    run_id = first.start(None)
    for step in range(2, 21, 2):
        first.log_metrics(step, {"train_loss": float(step)})
    first.finish("KILLED")
    assert client.get_run(run_id).info.status == "KILLED"

    # The checkpoint was at step 12: steps 14..20 are logged again, with new values.
    second = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="r")
    assert second.start(run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(14, 31, 2):
        second.log_metrics(step, {"train_loss": -float(step)})
    second.finish("FINISHED")

    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == list(range(2, 31, 2))
    assert {m.step: m.value for m in history}[20] == 20.0  # the first value of a step is kept
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_a_resume_resends_the_history_points_the_server_lacks_exactly_once(mlflow_server, caplog) -> None:
    """Points logged within the flush window before a crash live only in the checkpoint's history: the resumed
    tracker sends the (key, step) pairs the run lacks, whatever their place, and nothing twice."""
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    client = MlflowClient(mlflow_server.uri)
    history = [{"step": s, "epoch": s / 10, "train_loss": 1.0 / s} for s in range(2, 13, 2)]
    history.append({"step": 12, "epoch": 1.0, "val_top1_error": 50.0})  # an evaluation at a logged step
    first = build_tracker(_cfg(mlflow_server.uri, system_metrics=False), is_main=True, run_name="h")
    run_id = first.start(None)
    for row in history[:2] + history[3:4]:  # 2, 4 and 8 reached the server; 6, 10 and 12 were lost
        first.log_metrics(row["step"], {k: v for k, v in row.items() if k != "step"})
    first.finish("KILLED")
    assert _steps(client, run_id, "train_loss") == [2, 4, 8]

    for _ in range(2):  # a second resume from the same checkpoint finds nothing missing
        tracker = build_tracker(_cfg(mlflow_server.uri, system_metrics=False), is_main=True, run_name="h")
        assert tracker.start(run_id) == run_id
        tracker.resend_history(history)
        tracker.log_metrics(14, {"train_loss": 1 / 14, "epoch": 1.4})
        tracker.finish("FINISHED")
    assert caplog.text.count("re-sent") == 1
    assert "re-sent 7 metric points of steps 6-12" in caplog.text  # train_loss and epoch at 6, 10, 12; val at 12
    # Sorted by step: MLflow lists a key's points by time, and the re-sent ones arrived last.
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss"))
    assert loss == [(s, 1.0 / s) for s in range(2, 15, 2)]
    epoch = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch"))
    assert epoch == [(s, s / 10) for s in range(2, 15, 2)]  # at 12 the first value, as the trainer logged it
    assert _steps(client, run_id, "val_top1_error") == [12]


def test_outage_buffers_metrics_and_delivers_them_after_restart(mlflow_server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    client = MlflowClient(mlflow_server.uri)
    tracker = build_tracker(_cfg(mlflow_server.uri, system_metrics=False), is_main=True, run_name="o")
    run_id = tracker.start(None)
    for step in range(1, 11):
        tracker.log_metrics(step, {"train_loss": 1.0})
    assert tracker.sender.flush(10)
    mlflow_server.stop(kill=True)
    t0 = time.monotonic()
    for step in range(11, 41):
        tracker.log_metrics(step, {"train_loss": 2.0})
        time.sleep(0.05)
    assert time.monotonic() - t0 < 5  # logging never waits for the server
    deadline = time.monotonic() + 10
    while "unreachable" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "unreachable" in caplog.text
    mlflow_server.start()
    tracker.finish("FINISHED")
    assert _steps(client, run_id, "train_loss") == list(range(1, 41))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "reachable again" in caplog.text


def test_unreachable_server_never_blocks_and_the_buffer_is_bounded(caplog) -> None:
    from mlflow_server import free_port

    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    cfg = _cfg(
        f"http://127.0.0.1:{free_port()}",
        max_buffered=50,
        start_timeout_s=1.0,
        finish_timeout_s=1.0,
        system_metrics=False,
    )
    tracker = build_tracker(cfg, is_main=True)
    t0 = time.monotonic()
    assert tracker.start(None) is None
    for step in range(200):
        tracker.log_metrics(step, {"train_loss": 1.0})
    tracker.log_params({"a": "1"})
    tracker.finish("FINISHED")
    assert time.monotonic() - t0 < 10
    assert tracker.sender.points_dropped == 150
    assert "buffer full" in caplog.text and "were not sent" in caplog.text


def test_disabled_tracking_and_followers_do_nothing() -> None:
    assert isinstance(build_tracker(TrackingConfig(enabled=False), is_main=True), NullTracker)
    follower = build_tracker(TrackingConfig(uri="http://127.0.0.1:9"), is_main=False, is_local_main=False)
    assert follower.start("abc") is None  # no process group: nothing was broadcast
    follower.log_metrics(1, {"x": 1.0})
    follower.finish()


# -- end to end: pipeline.train through the server ----------------------------------------------------
def _train_args(tmp_path: Path, uri: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/cpu/digits_resnet20.toml"),
        *TINY,
        f"--data.cache_dir={REPO / '.cache/datasets'}",
        f"--checkpoint.uri={tmp_path / 'ckpt'}",
        f"--output_dir={tmp_path / 'runs/{name}'}",
        f"--tracking.uri={uri}",
        "--tracking.experiment=e2e",
        "--tracking.flush_interval_s=0.5",
        "--tracking.system_metrics_interval_s=1",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""}


@pytest.mark.slow
def test_two_rank_run_logs_exactly_one_run(mlflow_server, tmp_path: Path) -> None:
    """Two nodes of one rank each: rank 0 logs the run; node 1 adds its system metrics to it."""
    from mlflow_server import free_port

    args = _train_args(tmp_path, mlflow_server.uri, "--name=two_rank", "--tracking.study=unit-study")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(REPO / "pipeline/train.py"),
                *args,
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "two_rank"
    expected = flatten(load_config(args[1], args[2:]))
    # The config, plus the experiment's identity (tests/test_mlflow_records.py checks those in a study); a key left
    # empty is logged as what the run resolved it to.
    params = run.data.params
    assert {k: params[k] for k in expected if expected[k]} == {k: v for k, v in expected.items() if v}
    assert (params["model.shortcut"], params["run_id"]) == ("A", "two_rank")
    assert {k: params[k] for k in ("depth", "residual", "shortcut", "world_size", "global_batch")} == {
        "depth": "20",
        "residual": "true",
        "shortcut": "A",
        "world_size": "2",
        "global_batch": "64",
    }
    tags = run.data.tags
    assert {k: tags[k] for k in ("depth", "residual", "shortcut", "dataset", "study", "world_size")} == {
        "depth": "20",
        "residual": "true",
        "shortcut": "A",
        "dataset": "digits",
        "study": "unit-study",
        "world_size": "2",
    }
    assert tags["gpu_type"] and tags["git_commit"]
    rid = run.info.run_id
    for key in ("train_loss", "lr", "images_per_s", "data_wait_share", "train_top1_error", "train_top5_error"):
        assert _steps(client, rid, key) == [2, 4, 6, 8, 10], key
    for key in ("val_loss", "val_top1_error", "val_top5_error"):
        assert _steps(client, rid, key) == [10], key
    assert any(k.startswith("system/node_0/cpu") for k in run.data.metrics)
    assert any(k.startswith("system/node_1/cpu") for k in run.data.metrics)
    assert [a.path for a in client.list_artifacts(rid)] == ["config.toml"]
    assert [m.source_run_id for m in client.search_logged_models([exp.experiment_id])] == [rid]
    # Only rank 0 talks to the console.
    assert "MLflow" not in outs[1]


@pytest.mark.slow
def test_server_killed_mid_run_then_resume_continues_the_run(mlflow_server, tmp_path: Path) -> None:
    """Kill the server while training: training finishes and the buffered metrics arrive after a
    restart. Then a longer run of the same id resumes from its step-16 checkpoint into the same MLflow
    run, logging steps 18 and 20 a second time without duplicate points."""
    client = MlflowClient(mlflow_server.uri)
    common = [
        "--name=outage",
        "--checkpoint.every_steps=4",
        "--checkpoint.at_end=false",
        "--tracking.system_metrics=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        *_train_args(tmp_path, mlflow_server.uri, *common),
        "--schedule.max_steps=20",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()], filter_string="attributes.run_name = 'outage'"
            )
            if runs and runs[0].data.metrics.get("train_loss") is not None:
                run_id = runs[0].info.run_id
                break
            time.sleep(0.5)
        assert run_id, "no metric arrived"
        assert proc.poll() is None, "training ended before the outage"
        mlflow_server.stop(kill=True)
        time.sleep(4)  # if training ends meanwhile, its finish() waits for the server (finish_timeout_s)
        mlflow_server.start()
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "unreachable" in out
    assert _steps(client, run_id, "train_loss") == list(range(2, 21, 2))
    assert client.get_run(run_id).info.status == "FINISHED"

    # Resume: the newest checkpoint is step 16 (every 4 steps, none at the end); 18 and 20 are logged again.
    cmd[-1] = "--schedule.max_steps=24"
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "resumed run outage at step 16" in res.stderr
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert _steps(client, run_id, "train_loss") == list(range(2, 25, 2))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_points_lost_to_a_sigkill_are_resent_from_the_checkpoint_on_resume(mlflow_server, tmp_path: Path) -> None:
    """No flush during training (a flush interval longer than the run), SIGKILL after a checkpoint: the points
    up to it exist only in its history. The resumed run sends them once; MLflow ends with every step once."""
    client = MlflowClient(mlflow_server.uri)
    extra = ["--name=resend", "--checkpoint.every_steps=4", "--tracking.system_metrics=false"]
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        *_train_args(tmp_path, mlflow_server.uri, *extra),
        "--tracking.flush_interval_s=3600",
        "--schedule.max_steps=120",
    ]
    latest = tmp_path / "ckpt" / "resend" / "latest"
    with open(tmp_path / "first.log", "w") as first_log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=first_log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if latest.exists() and int(latest.read_text().strip().removeprefix("step-") or 0) >= 8:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "training ended before the SIGKILL: " + (tmp_path / "first.log").read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="attributes.run_name = 'resend'"
    )
    run_id = run.info.run_id
    lost = _steps(client, run_id, "train_loss")
    assert lost == [], lost  # nothing was flushed while training

    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "re-sent" in res.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for key in ("train_loss", "lr", "epoch", "images_per_s"):
        assert _steps(client, run_id, key) == list(range(2, 121, 2)), key
    assert _steps(client, run_id, "val_top1_error") == [44, 88, 120]
