"""End to end: `pipeline/train.py` on 2 CPU ranks under torchrun, stopped, killed and resumed.

Every run is the digits demo cut to 6 steps of batch 16. A reference run goes straight through; the
others are stopped by SIGUSR1, lose a rank or the S3 endpoint in the middle of an upload, and are
resumed; each must reproduce the reference's loss at every step and its final weights bit for bit.
Test hooks (the signal at a known step, pausing an upload) live in tests/helpers/train_wrapper.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.core.stop import STOP_EXIT_CODE
from pipeline.core.storage import sha256_file
from pipeline.runtime.progress import unwrap_lines

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
ARGS = [
    "--config",
    "configs/cpu/digits_resnet20.toml",
    "--data.batch_size=16",
    f"--schedule.max_steps={STEPS}",
    "--schedule.unit=step",
    "--schedule.milestones=[]",
    "--schedule.warmup=0",
    "--log_every=1",
    "--tracking.enabled=false",
    "--progress=false",
    "--checkpoint.every_steps=2",
]


def _launch(
    tmp: Path, name: str, *, run_id: str, uri: str, env: dict[str, str] | None = None, extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "helpers" / "train_wrapper.py"),
        *ARGS,
        f"--run_id={run_id}",
        f"--output_dir={tmp / 'out' / name}",
        f"--checkpoint.uri={uri}",
        f"--checkpoint.staging_dir={tmp / 'staging' / name}",
        *(extra or []),
    ]
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TEST_LOSSES": str(tmp / f"{name}.jsonl"),
        **(env or {}),
    }
    # A session of its own, so a test can kill the launcher and its workers together.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, log


def _run(tmp: Path, name: str, **kw: Any) -> tuple[int, str]:
    proc, log = _launch(tmp, name, **kw)
    try:
        rc = proc.wait(timeout=300)
    finally:
        _kill(proc)
    return rc, log.read_text(errors="replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every worker (torchrun puts workers in sessions of their own)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def _losses(*files: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for f in files:
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out[row["step"]] = row["train_loss"]
    return out


def _final(uri_dir: Path | bytes) -> dict[str, Any]:
    import io

    sd = torch.load(io.BytesIO(uri_dir) if isinstance(uri_dir, bytes) else uri_dir, weights_only=False)
    return {"module": sd["module"], "optimizer": sd["optimizer"]}


def _assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["module"].keys() == b["module"].keys()
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    ma = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mb = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(ma) == len(mb) and all(torch.equal(x, y) for x, y in zip(ma, mb, strict=True))


def _text(log: Path) -> str:
    """The log with long lines joined back (the log format wraps lines over 300 characters)."""
    return unwrap_lines(log.read_text())


def _wait_for(pred: Any, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}:\n{_text(log)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{_text(log)[-4000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("reference")
    rc, text = _run(tmp, "ref", run_id="ref", uri=str(tmp / "ckpt"))
    assert rc == 0, text[-4000:]
    losses = _losses(tmp / "ref.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {"losses": losses, "final": _final(tmp / "ckpt" / "ref" / f"step-{STEPS}" / "mp_rank_00_model_states.pt")}


def _s3(request: pytest.FixtureRequest) -> tuple[str, dict[str, str], Any]:
    import s3fs
    from s3_server import aws_env

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True, use_listings_cache=False
    )
    return f"{bucket}/ckpt", aws_env(endpoint), fs


def _stop_then_resume(tmp: Path, uri: str, env: dict[str, str], *, second_signal: bool = False) -> str:
    extra = {"TEST_SECOND_SIGNAL": "1"} if second_signal else {}
    rc, text = _run(tmp, "stopped", run_id="r", uri=uri, env={**env, "TEST_SIGNAL_AT": "3", **extra})
    # Rank 0 exits with the requeue code once step-3 is committed (torchrun itself reports a failure).
    assert f"exitcode  : {STOP_EXIT_CODE}" in text, text[-4000:]
    assert "stopped by SIGUSR1 at step 3; checkpoint committed" in text
    assert sorted(_losses(tmp / "stopped.jsonl")) == [1, 2, 3]
    return text


def test_exact_resume_local(reference: dict[str, Any], tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    _stop_then_resume(tmp_path, uri, {}, second_signal=True)  # a SIGTERM lands on every rank during the save
    assert (tmp_path / "ckpt" / "r" / "latest").read_text() == "step-3"
    rc, text = _run(tmp_path, "resumed", run_id="r", uri=uri)
    assert rc == 0, text[-4000:]
    assert "resumed run r at step 3" in text
    assert _losses(tmp_path / "stopped.jsonl", tmp_path / "resumed.jsonl") == reference["losses"]
    final = tmp_path / "ckpt" / "r" / f"step-{STEPS}"
    _assert_same_weights(reference["final"], _final(final / "mp_rank_00_model_states.pt"))
    # The manifest lists every rank's files with checksums that match what is stored.
    m = json.loads((final / "manifest.json").read_text())
    assert m["world_size"] == 2 and {f["rank"] for f in m["files"]} == {0, 1}
    for f in m["files"]:
        assert sha256_file(final / f["path"]).sha256 == f["sha256"]


def test_exact_resume_s3_and_sigkill_mid_upload(
    reference: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri, env, fs = _s3(request)
    run = f"{uri[5:]}/r"
    _stop_then_resume(tmp_path, uri, env)
    assert fs.cat_file(f"{run}/latest") == b"step-3"
    # Resume, and SIGKILL rank 0 halfway through uploading step-4 (one of its two files sent).
    pause = tmp_path / "pause"
    pause.mkdir()
    proc, log = _launch(
        tmp_path, "killed", run_id="r", uri=uri, env={**env, "TEST_PAUSE_UPLOAD": f"step-4:0:2:{pause}"}
    )
    try:
        _wait_for(lambda: (pause / "paused-rank0").exists(), "the paused upload", proc, log)
        os.kill(int((pause / "paused-rank0").read_text()), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        _kill(proc)
    assert fs.cat_file(f"{run}/latest") == b"step-3"
    assert not fs.exists(f"{run}/step-4/manifest.json") and fs.exists(f"{run}/step-3/manifest.json")
    rc, text = _run(tmp_path, "resumed", run_id="r", uri=uri, env=env)
    assert rc == 0, text[-4000:]
    assert "resumed run r at step 3" in text
    assert _losses(tmp_path / "stopped.jsonl", tmp_path / "resumed.jsonl") == reference["losses"]
    _assert_same_weights(reference["final"], _final(fs.cat_file(f"{run}/step-{STEPS}/mp_rank_00_model_states.pt")))


def test_server_outage_mid_upload(reference: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from s3_server import restart_server, stop_server

    uri, env, fs = _s3(request)
    endpoint = env["AWS_ENDPOINT_URL"]
    run = f"{uri[5:]}/r"
    pause = tmp_path / "pause"
    pause.mkdir()
    proc, log = _launch(
        tmp_path, "outage", run_id="r", uri=uri, env={**env, "TEST_PAUSE_UPLOAD": f"step-4:0:2:{pause}"}
    )
    try:
        _wait_for(lambda: (pause / "paused-rank0").exists(), "the paused upload", proc, log)
        stop_server(endpoint)  # the endpoint dies halfway through step-4's upload
        (pause / "go").touch()
        losses = tmp_path / "outage.jsonl"
        _wait_for(lambda: STEPS in _losses(losses), "training to go on while S3 is down", proc, log)
        _wait_for(lambda: "retry 2 in" in _text(log), "the upload retries", proc, log)
        text = _text(log)
        assert "pending: step-4 (1 of 2 files" in text and "cannot be reached" in text
        _kill(proc)  # the whole job dies while the endpoint is down
    finally:
        _kill(proc)
        restart_server(endpoint)
    assert fs.cat_file(f"{run}/latest") == b"step-2"
    assert not fs.exists(f"{run}/step-4/manifest.json")
    rc, text = _run(tmp_path, "resumed", run_id="r", uri=uri, env=env)
    assert rc == 0, text[-4000:]
    assert "resumed run r at step 2" in text
    merged = {**_losses(tmp_path / "outage.jsonl"), **_losses(tmp_path / "resumed.jsonl")}
    assert merged == reference["losses"]
    _assert_same_weights(reference["final"], _final(fs.cat_file(f"{run}/step-{STEPS}/mp_rank_00_model_states.pt")))


def test_missing_bucket_fails_before_training(tmp_path: Path, s3_endpoint: str) -> None:
    from s3_server import aws_env

    rc, text = _run(tmp_path, "bad", run_id="b", uri="s3://no-such-bucket/ckpt", env=aws_env(s3_endpoint))
    assert rc != 0
    assert "s3://no-such-bucket/ckpt" in text and "bucket 'no-such-bucket' does not exist" in text, text[-3000:]
    assert not (tmp_path / "bad.jsonl").exists()  # not a single step ran


def test_stop_while_s3_is_down_then_the_next_start_uploads_the_stranded_steps(
    reference: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """S3 killed and restarted empty (bucket gone) mid-run: training blocks on storage, SIGTERM ends it
    promptly with the stop code naming the staged steps; the next start (the same, shared staging folder,
    bucket re-created) uploads them and resumes from the newest, on the reference's path."""
    import re

    import psutil
    from s3_server import restart_server, stop_server

    uri, env, fs = _s3(request)
    endpoint = env["AWS_ENDPOINT_URL"]
    run = f"{uri[5:]}/r"
    shared = tmp_path / "shared-staging"
    extra = [f"--checkpoint.staging_dir={shared}", "--checkpoint.every_steps=1", "--checkpoint.max_pending=1"]
    pause = tmp_path / "pause"
    pause.mkdir()
    proc, log = _launch(
        tmp_path, "down", run_id="r", uri=uri, env={**env, "TEST_PAUSE_UPLOAD": f"step-3:0:1:{pause}"}, extra=extra
    )
    try:
        _wait_for(lambda: (pause / "paused-rank0").exists(), "the paused upload", proc, log)
        stop_server(endpoint, lose_data=True)
        restart_server(endpoint)  # an empty server: the bucket is gone
        (pause / "go").touch()
        _wait_for(lambda: "training blocked on storage" in _text(log), "training to block", proc, log)
        _wait_for(
            lambda: re.search(r"failed on rank 0 .*; training blocked on storage\n", _text(log)),
            "an upload retry line that says training is blocked",
            proc,
            log,
        )
        t0 = time.monotonic()
        for worker in psutil.Process(proc.pid).children():  # as launch/torchrun_node.sh passes a stop on
            worker.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        _kill(proc)
    text = _text(log)
    assert took < 60, (took, text[-4000:])
    assert f"exitcode  : {STOP_EXIT_CODE}" in text, text[-4000:]
    named = re.search(
        r"steps (step-\d+(?:, step-\d+)*) never reached the store; they stay in the staging folder (\S+)", text
    )
    assert named and named.group(2) == str(shared / "r"), text[-4000:]
    stranded = named.group(1).split(", ")
    assert {"step-4", "step-5"} <= set(stranded), stranded
    assert "stopped by SIGTERM at step 5" in text and "staged, not committed" in text
    blocked = text[text.index("training blocked on storage") : text.index("a stop was requested while training")]
    assert "training goes on" not in blocked
    assert sorted(_losses(tmp_path / "down.jsonl")) == [1, 2, 3, 4, 5]

    fs.mkdir(uri[5:].split("/")[0])  # the bucket is re-created, empty
    rc, text = _run(tmp_path, "after", run_id="r", uri=uri, env=env, extra=extra)
    assert rc == 0, text[-4000:]
    assert "checkpoint step-5 of run r never reached" in text and "resumed run r at step 5" in text, text[-4000:]
    merged = {**_losses(tmp_path / "down.jsonl"), **_losses(tmp_path / "after.jsonl")}
    assert merged == reference["losses"]
    _assert_same_weights(reference["final"], _final(fs.cat_file(f"{run}/step-{STEPS}/mp_rank_00_model_states.pt")))
    assert not list(shared.glob("r/rank-*/step-*"))  # every staged step went to the store or was superseded
