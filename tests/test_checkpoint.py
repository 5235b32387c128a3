"""pipeline.checkpoint: commit order, retention, verification and fallback, outages, bad storage input.

Most tests drive the Checkpointer in-process with a stand-in engine (world of one, fast); the tests at
the end run a tiny real DeepSpeed engine on 2 ranks under torchrun (gloo, CPU).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.checkpoint import Checkpointer, CheckpointError
from pipeline.checkpoint.layout import committed_tags, read_manifest
from pipeline.config import CheckpointConfig
from pipeline.core.storage import Storage, sha256_file

ROOT = Path(__file__).resolve().parents[1]


class FakeEngine:
    """The two DeepSpeed engine calls the Checkpointer makes, on one tensor."""

    def __init__(self, value: float = 0.0) -> None:
        self.w = torch.full((4096,), value)

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.w.clone()}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str | None, dict[str, Any]]:
        f = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        if not f.exists():
            return None, {}
        self.w = torch.load(f)["w"]
        return str(f), {}


def _aws(monkeypatch: pytest.MonkeyPatch, endpoint: str, key: str = "testing") -> None:
    from s3_server import aws_env

    for k, v in aws_env(endpoint, key=key, secret=key).items():
        monkeypatch.setenv(k, v)


def _ck(uri: str, tmp_path: Path, **cfg: Any) -> Checkpointer:
    return Checkpointer(
        CheckpointConfig(uri=uri, **cfg),
        run_id="run",
        rank=0,
        world_size=1,
        config_hash="h",
        staging_dir=str(tmp_path / "staging"),
    )


def _save(ck: Checkpointer, step: int) -> FakeEngine:
    eng = FakeEngine(float(step))
    ck.save(eng, step=step, epoch=step // 10, trainer_state={"step": step})
    return eng


@pytest.fixture
def s3_uri(s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A checkpoint folder in the test bucket, with this process's AWS settings pointing at the server."""
    _aws(monkeypatch, s3_endpoint)
    return f"{s3_bucket}/ckpt"


@pytest.fixture(params=["local", "s3"])
def uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return request.getfixturevalue("s3_uri")


def _ck_with_step_1(uri: str, tmp_path: Path, **cfg: Any) -> Checkpointer:
    """A Checkpointer whose step-1 is saved and committed."""
    ck = _ck(uri, tmp_path, **cfg)
    _save(ck, 1)
    ck.wait()
    return ck


def test_commit_manifest_latest_and_retention(uri: str, tmp_path: Path) -> None:
    ck = _ck(uri, tmp_path, keep_last=2, keep_every=3)
    ck.check_access()
    for step in range(1, 8):
        _save(ck, step)
    ck.close()
    run = Storage(uri).child("run")
    assert run.read_text("latest") == "step-7"
    assert committed_tags(run) == ["step-7", "step-6", "step-3"]  # newest 2, plus every 3rd
    assert [n for n in run.list() if n.startswith("step-")] == ["step-3", "step-6", "step-7"]
    m = read_manifest(run, "step-7")
    assert (m["step"], m["epoch"], m["config_hash"], m["world_size"]) == (7, 0, "h", 1)
    got = run.get("step-7/mp_rank_00_model_states.pt", tmp_path / "m.pt")
    (f,) = [f for f in m["files"] if f["path"] == "mp_rank_00_model_states.pt"]
    assert (f["size"], f["sha256"]) == (got.size, got.sha256)
    assert {f["path"] for f in m["files"]} == {"mp_rank_00_model_states.pt", "trainer-rank0.pt"}
    assert not list((tmp_path / "staging").rglob("*.pt"))  # staged files go once uploaded


def test_resume_restores_newest(uri: str, tmp_path: Path) -> None:
    ck = _ck(uri, tmp_path)
    for step in (2, 4):
        _save(ck, step)
    ck.close()
    eng = FakeEngine(-1.0)
    state = _ck(uri, tmp_path).resume(eng)
    assert state == {"step": 4} and torch.equal(eng.w, torch.full((4096,), 4.0))


def test_resume_under_another_config_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = str(tmp_path / "ckpt")
    ck = _ck(uri, tmp_path)
    _save(ck, 1)
    ck.close()
    other = Checkpointer(
        CheckpointConfig(uri=uri),
        run_id="run",
        rank=0,
        world_size=1,
        config_hash="changed",
        staging_dir=str(tmp_path / "staging"),
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert other.resume(FakeEngine()) == {"step": 1}
    (rec,) = [r for r in caplog.records if "config differs" in r.getMessage()]
    assert rec.levelno == logging.WARNING and "hash h, now changed" in rec.getMessage()


def test_stopped_upload_thread_is_reported_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.checkpoint.upload import Uploader

    def broken(self: Uploader, job: Any) -> None:
        raise RuntimeError("a bug in the upload thread")

    monkeypatch.setattr(Uploader, "_run", broken)
    ck = _ck(str(tmp_path / "ckpt"), tmp_path)
    _save(ck, 1)
    with pytest.raises(CheckpointError) as e:
        ck.close()
    msg = str(e.value)
    assert "upload thread on rank 0 has stopped" in msg and "did not finish within" not in msg, msg
    assert "step-1" in msg and str(tmp_path / "staging" / "run") in msg, msg
    assert (tmp_path / "staging" / "run" / "rank-00000" / "step-1" / "mp_rank_00_model_states.pt").exists()


def _flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_file_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = str(tmp_path / "ckpt")
    ck = _ck(uri, tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(ck, step)
    ck.close()
    bad = tmp_path / "ckpt" / "run" / "step-3" / "mp_rank_00_model_states.pt"
    _flip_byte(bad)
    (tmp_path / "ckpt" / "run" / "step-2" / "trainer-rank0.pt").unlink()  # step-2 is incomplete
    eng = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        state = _ck(uri, tmp_path).resume(eng)
    assert state == {"step": 1} and float(eng.w[0]) == 1.0
    text = caplog.text
    assert f"{bad}" in text and "checksum" in text and "falling back to step-2" in text
    assert "step-2/trainer-rank0.pt cannot be read" in text and "falling back to step-1" in text
    run = Storage(uri).child("run")
    # The rejected ones are uncommitted but kept for inspection; latest follows the resumed one.
    assert run.read_text("latest") == "step-1" and committed_tags(run) == ["step-1"]
    assert run.exists("step-3/manifest.rejected.json")


def test_evaluate_names_the_older_step_it_falls_back_to_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pipeline.evaluate on a run whose newest checkpoint is damaged: the result is an older step's, and the log
    says which step and why, next to the result."""
    from pipeline.evaluate import resolve_checkpoint

    ck = _ck(str(tmp_path / "ckpt"), tmp_path, keep_last=3)
    for step in (1, 2):
        _save(ck, step)
    ck.close()
    _flip_byte(tmp_path / "ckpt" / "run" / "step-2" / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate"):
        folder, manifest = resolve_checkpoint(str(tmp_path / "ckpt" / "run"))
    assert folder.endswith("/run/step-1") and manifest is not None and manifest["step"] == 1
    assert "evaluating" in caplog.text and "(step 1), not the newest committed checkpoint" in caplog.text
    assert "step-2 failed verification" in caplog.text and "sha256" in caplog.text.lower(), caplog.text


def test_first_good_walks_newest_first_and_names_the_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.checkpoint.layout import committed_candidates, first_good

    ck = _ck(str(tmp_path / "ckpt"), tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(ck, step)
    ck.close()
    run = Storage(str(tmp_path / "ckpt")).child("run")
    candidates = committed_candidates(run)

    def check(tag: str, manifest: dict[str, Any]) -> None:
        if tag != "step-1":
            raise CheckpointError(f"{tag} is bad")

    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        chosen, rejected = first_good(run, candidates, check)
    assert chosen is not None and chosen[0] == "step-1" and chosen[1]["step"] == 1
    assert rejected == [("step-3", "step-3 is bad"), ("step-2", "step-2 is bad")]
    assert f"checkpoint {run.url('step-3')} rejected: step-3 is bad; falling back to step-2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        chosen, rejected = first_good(run, candidates[:2], check, announce=False)
    assert chosen is None and [t for t, _ in rejected] == ["step-3", "step-2"] and not caplog.records


def test_s3_corrupt_object_is_rejected(s3_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = _ck(s3_uri, tmp_path)
    for step in (1, 2):
        _save(ck, step)
    ck.close()
    run = Storage(s3_uri).child("run")
    obj = "step-2/mp_rank_00_model_states.pt"
    data = bytearray(run.read_bytes(obj))
    data[-10] ^= 0x80
    run.write_bytes(obj, bytes(data))
    eng = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert _ck(s3_uri, tmp_path).resume(eng) == {"step": 1}
    assert run.url(obj) in caplog.text and "checksum" in caplog.text


def test_latest_present_but_nothing_valid_refuses_to_start(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    ck = _ck(uri, tmp_path)
    _save(ck, 1)
    ck.close()
    _flip_byte(tmp_path / "ckpt" / "run" / "step-1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="refusing to start from scratch.*resume=never"):
        _ck(uri, tmp_path).resume(FakeEngine())
    # latest exists but is unreadable, and no manifest at all
    run = Storage(uri).child("run")
    run.delete("step-1", recursive=True)
    (tmp_path / "ckpt" / "run" / "latest").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="latest exists but no committed checkpoint"):
        _ck(uri, tmp_path).resume(FakeEngine())


def test_no_checkpoint_starts_fresh_and_never_sets_aside(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    assert _ck(uri, tmp_path).resume(FakeEngine()) is None
    ck = _ck(uri, tmp_path)
    _save(ck, 5)
    ck.close()
    assert _ck(uri, tmp_path, resume="never").resume(FakeEngine()) is None
    run = Storage(uri).child("run")
    assert committed_tags(run) == [] and run.exists("step-5/manifest.set-aside.json") and not run.exists("latest")


def test_resume_from_explicit_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "ckpt")
    ck = _ck(uri, tmp_path, keep_last=3)
    for step in (1, 2):
        _save(ck, step)
    ck.close()
    other = Checkpointer(
        CheckpointConfig(uri=str(tmp_path / "other"), resume=f"{uri}/run/step-1"),
        run_id="new",
        rank=0,
        world_size=1,
        config_hash="h",
        staging_dir=str(tmp_path / "s2"),
    )
    eng = FakeEngine()
    assert other.resume(eng) == {"step": 1} and float(eng.w[0]) == 1.0
    assert Storage(uri).child("run").read_text("latest") == "step-2"  # another run's folder is left alone


def test_outage_retries_in_background_then_commits(
    s3_uri: str, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from s3_server import restart_server, stop_server

    ck = _ck_with_step_1(s3_uri, tmp_path)
    stop_server(s3_endpoint)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        t0 = time.monotonic()
        _save(ck, 2)
        assert time.monotonic() - t0 < 2  # the training loop is not held up by the dead endpoint
        deadline = time.monotonic() + 20
        while "retry 2" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
    assert "step-2" in ck.pending() and "cannot be reached" in caplog.text and "pending: step-2" in caplog.text
    assert (tmp_path / "staging" / "run" / "rank-00000" / "step-2").is_dir()  # nothing lost meanwhile
    restart_server(s3_endpoint)
    ck.close()
    assert Storage(s3_uri).child("run").read_text("latest") == "step-2"


def test_crash_during_outage_keeps_previous_latest(s3_uri: str, s3_endpoint: str, tmp_path: Path) -> None:
    from s3_server import outage

    ck = _ck_with_step_1(s3_uri, tmp_path)
    with outage(s3_endpoint):
        _save(ck, 2)
        time.sleep(0.5)
        ck._saver.uploader.close()  # the process "dies" with step-2 unsent
    run = Storage(s3_uri).child("run")
    assert run.read_text("latest") == "step-1" and committed_tags(run) == ["step-1"]
    eng = FakeEngine()
    # A start that cannot see the staged step-2 (another node's staging folder) resumes from step-1.
    assert _ck(s3_uri, tmp_path / "other-node").resume(eng) == {"step": 1}


def test_next_start_uploads_the_staged_steps_and_resumes_from_the_newest(
    s3_uri: str, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from s3_server import outage

    ck = _ck_with_step_1(s3_uri, tmp_path, max_pending=3)
    with outage(s3_endpoint):
        _save(ck, 2)
        _save(ck, 3)
        ck._saver.uploader.close()  # the process "dies" with step-2 and step-3 unsent
    staged = tmp_path / "staging" / "run" / "rank-00000"
    assert (staged / "step-3.staged.json").exists()
    eng = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert _ck(s3_uri, tmp_path).resume(eng) == {"step": 3} and float(eng.w[0]) == 3.0
    assert "step-3 of run run never reached" in caplog.text and str(tmp_path / "staging" / "run") in caplog.text
    run = Storage(s3_uri).child("run")
    assert run.read_text("latest") == "step-3" and committed_tags(run) == ["step-3", "step-2"]
    assert not any(staged.iterdir())  # uploaded, so no longer staged


def test_next_start_without_every_ranks_staged_files_says_what_it_loses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = str(tmp_path / "ckpt")
    ck = _ck_with_step_1(uri, tmp_path)
    _save(ck, 4)
    ck._saver.uploader.close()  # may have sent it already: stage a step by hand that claims a second rank
    marker = tmp_path / "staging" / "run" / "rank-00000" / "step-6.staged.json"
    (marker.parent / "step-6").mkdir(parents=True)
    meta = {"tag": "step-6", "step": 6, "world_size": 2}
    marker.write_text(json.dumps({"meta": meta, "session": "old", "rank": 0}))
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert _ck(uri, tmp_path).resume(FakeEngine()) == {"step": 4}
    assert "step-6 (in " in caplog.text and "rank(s) 1" in caplog.text, caplog.text
    assert "resuming from the newest committed checkpoint (step-4) loses 2 steps" in caplog.text
    assert marker.exists()  # kept: another start may still find rank 1's files


def test_blocked_save_fails_after_max_wait_naming_the_staged_steps(
    s3_uri: str, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from s3_server import outage

    ck = _ck_with_step_1(s3_uri, tmp_path, max_pending=1, max_wait_s=6)
    with outage(s3_endpoint), caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        _save(ck, 2)
        t0 = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            _save(ck, 3)  # waits for step-2, which cannot be sent
        waited = time.monotonic() - t0
        ck._saver.uploader.close()
    assert 6 <= waited < 60, waited
    msg = str(e.value)
    assert s3_uri in msg and "step-2, step-3" in msg and str(tmp_path / "staging" / "run") in msg, msg
    assert "training blocked on storage" in caplog.text
    retries = [
        r.getMessage() for r in caplog.records if "retry" in r.getMessage() and "failed on rank" in r.getMessage()
    ]
    assert any(m.endswith("training blocked on storage") for m in retries), retries
    assert (tmp_path / "staging" / "run" / "rank-00000" / "step-3.staged.json").exists()  # saved what it could


def test_stop_while_blocked_on_storage_stages_and_names_the_steps(
    s3_uri: str, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from s3_server import outage

    from pipeline.core.stop import StopFlag

    stop = StopFlag()
    ck = Checkpointer(
        CheckpointConfig(uri=s3_uri, max_pending=1, stop_wait_s=2),
        run_id="run",
        rank=0,
        world_size=1,
        config_hash="h",
        staging_dir=str(tmp_path / "staging"),
        stop=stop,
    )
    _save(ck, 1)
    ck.wait()
    with outage(s3_endpoint), caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        _save(ck, 2)
        threading.Timer(1.0, stop.request).start()
        t0 = time.monotonic()
        _save(ck, 3)  # blocked until the stop request, then written to the staging folder only
        assert time.monotonic() - t0 < 30
        ck.close()  # gives up on the commits that make no progress
        took = time.monotonic() - t0
    assert took < 60 and ck.stranded == ["step-2", "step-3"], (took, ck.stranded)
    text = caplog.text
    assert "training blocked on storage" in text and "steps step-2, step-3 never reached the store" in text
    assert str(tmp_path / "staging" / "run") in text and "step-1, its last committed checkpoint" in text
    # The next start (same staging folder, store back) uploads both and resumes from step-3.
    eng = FakeEngine()
    assert _ck(s3_uri, tmp_path).resume(eng) == {"step": 3}
    assert Storage(s3_uri).child("run").read_text("latest") == "step-3"


def test_hung_store_is_cut_by_the_read_timeout_and_retried_with_a_log_line(
    s3_uri: str, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from s3_server import paused

    ck = _ck(s3_uri, tmp_path, read_timeout_s=1, connect_timeout_s=1)
    ck.check_access()
    with caplog.at_level(logging.WARNING), paused(s3_endpoint):
        t0 = time.monotonic()
        _save(ck, 1)
        while "failed on rank 0" not in caplog.text and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        first_line = time.monotonic() - t0
    assert first_line < 30, first_line  # not one silent 120 s read timeout (or 3 x 5 of them)
    assert "timeout" in caplog.text.lower() and "trying again in" in caplog.text
    ck.close()  # the server is back: the retry commits it
    assert Storage(s3_uri).child("run").read_text("latest") == "step-1"


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        (b"\x80\xff\x00\x9c binary", "exists but cannot be used (it holds binary bytes"),
        (b"step-99", "names step-99, which does not exist"),  # `printf step-99 > latest`
    ],
    ids=["binary", "missing-step"],
)
def test_bad_latest_falls_back_to_the_newest_committed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, warning: str
) -> None:
    uri = str(tmp_path / "ckpt")
    ck = _ck(uri, tmp_path)
    for step in (1, 2):
        _save(ck, step)
    ck.close()
    latest = tmp_path / "ckpt" / "run" / "latest"
    latest.write_bytes(content)
    eng = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert _ck(uri, tmp_path).resume(eng) == {"step": 2} and float(eng.w[0]) == 2.0
    assert f"{latest} {warning}" in caplog.text, caplog.text
    assert latest.read_text() == "step-2"  # mended


@pytest.mark.parametrize("key", ["max_wait_s", "stop_wait_s", "connect_timeout_s", "read_timeout_s"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_wait_and_timeout_settings_are_range_checked(key: str, value: float) -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=f"checkpoint.{key} = "):
        CheckpointConfig(**{key: value})


def test_zero1_reshard_on_a_deepspeed_without_its_private_methods_names_the_fix(tmp_path: Path) -> None:
    class Zero1Engine(FakeEngine):
        optimizer = object()  # an optimizer without DeepSpeed 0.19.8's private re-partitioning methods

        def zero_optimization_stage(self) -> int:
            return 1

    uri = str(tmp_path / "ckpt")
    ck = _ck(uri, tmp_path)
    ck.save(Zero1Engine(1.0), step=1, epoch=0, trainer_state={"step": 1})
    ck.close()
    bigger = Checkpointer(
        CheckpointConfig(uri=uri),
        run_id="run",
        rank=0,
        world_size=2,
        config_hash="h",
        staging_dir=str(tmp_path / "staging"),
    )
    with pytest.raises(CheckpointError) as e:
        bigger.resume(Zero1Engine())
    msg = str(e.value)
    assert "resharding it is unsupported on DeepSpeed" in msg and "_restore_elastic_base_optimizer_state" in msg, msg
    assert "resume at the old world size (1 ranks)" in msg and "deepspeed==0.19.8" in msg, msg


def test_time_based_saves_follow_the_clock(tmp_path: Path) -> None:
    ck = _ck(str(tmp_path / "c"), tmp_path, every_minutes=0.5 / 60, time_check_steps=2)
    assert not ck.should_save(1) and not ck.should_save(2)
    time.sleep(0.6)
    assert not ck.should_save(3)  # only checked every time_check_steps
    assert ck.should_save(4)
    assert _ck(str(tmp_path / "c"), tmp_path, every_steps=5).should_save(10)


@pytest.mark.parametrize("case", ["no_bucket", "credentials", "unreachable"])
def test_bad_storage_fails_at_start(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from s3_server import _free_port, start_moto_server

    if case == "no_bucket":
        _aws(monkeypatch, request.getfixturevalue("s3_endpoint"))
        expect = "bucket 'missing-bucket' does not exist"
    elif case == "unreachable":
        _aws(monkeypatch, f"http://127.0.0.1:{_free_port()}")
        expect = "cannot be reached"
    if case == "credentials":
        with start_moto_server(auth=True, log_dir=tmp_path) as url:
            _aws(monkeypatch, url, key="wrong")
            with pytest.raises(CheckpointError) as e:
                _ck("s3://missing-bucket/ckpt", tmp_path).check_access()
        expect = "check the credentials"
    else:
        with pytest.raises(CheckpointError) as e:
            _ck("s3://missing-bucket/ckpt", tmp_path).check_access()
    msg = str(e.value)
    assert "s3://missing-bucket/ckpt" in msg and expect in msg, msg


# --------------------------------------------------------------------------------------------------
# A real DeepSpeed engine on 2 ranks (torchrun, gloo on CPU).


def _torchrun(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(ROOT / "tests" / "helpers" / "ckpt_worker.py"),
        *args,
    ]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backend,zero", [("s3", 1)])  # ZeRO-0 on 2 local ranks: test_checkpoint_e2e.py
def test_deepspeed_two_ranks_roundtrip(backend: str, zero: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env: dict[str, str] = {}
    uri = str(tmp_path / "ckpt")
    if backend == "s3":
        from s3_server import aws_env

        env = aws_env(request.getfixturevalue("s3_endpoint"))
        uri = f"{request.getfixturevalue('s3_bucket')}/ckpt"
    common = ["--uri", uri, "--out", str(tmp_path), "--zero", str(zero)]
    p = _torchrun(2, "--phase", "train", "--steps", "4", "--save-at", "2,4", *common, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    # ZeRO-1 on a smaller world, which DeepSpeed alone refuses to re-partition (same-size resumes: e2e tests).
    for nproc in (1,) if zero else (2,):
        p = _torchrun(nproc, "--phase", "resume", *common, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        for r in range(nproc):
            a = torch.load(tmp_path / f"train-rank{r}.pt", weights_only=False)
            b = torch.load(tmp_path / f"resume-rank{r}.pt", weights_only=False)
            assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
            assert torch.equal(a["momentum"], b["momentum"])
            assert b["state"]["step"] == 4 and b["state"]["rank"] == r
            assert torch.equal(b["state"]["gen"], a["state"]["gen"] if a["state"] else b["state"]["gen"])
    if backend == "local":
        m = json.loads((tmp_path / "ckpt" / "unit" / "step-4" / "manifest.json").read_text())
        for f in m["files"]:
            assert sha256_file(tmp_path / "ckpt" / "unit" / "step-4" / f["path"]).sha256 == f["sha256"]
        assert m["world_size"] == 2 and {f["rank"] for f in m["files"]} == {0, 1}


@pytest.mark.slow
def test_deepspeed_zero1_grows_world(tmp_path: Path) -> None:
    common = ["--uri", str(tmp_path / "ckpt"), "--out", str(tmp_path), "--zero", "1"]
    assert (p := _torchrun(1, "--phase", "train", "--steps", "3", "--save-at", "3", *common)).returncode == 0, p.stderr[
        -3000:
    ]
    p = _torchrun(2, "--phase", "resume", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    a = torch.load(tmp_path / "train-rank0.pt", weights_only=False)
    for r in range(2):
        b = torch.load(tmp_path / f"resume-rank{r}.pt", weights_only=False)
        assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
        assert torch.equal(a["momentum"], b["momentum"])
        assert b["state"]["step"] == 3 and b["state"]["rank"] == 0  # rank 1 gets rank 0's shared part


@pytest.mark.slow
def test_deepspeed_two_ranks_resume_past_binary_bytes_in_latest(tmp_path: Path) -> None:
    common = ["--uri", str(tmp_path / "ckpt"), "--out", str(tmp_path)]
    p = _torchrun(2, "--phase", "train", "--steps", "4", "--save-at", "2,4", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    latest = tmp_path / "ckpt" / "unit" / "latest"
    latest.write_bytes(b"\x80\x81\xfe\xff\x00step")  # was a bare UnicodeDecodeError on every resume
    p = _torchrun(2, "--phase", "resume", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{latest} exists but cannot be used (it holds binary bytes" in p.stderr, p.stderr[-3000:]
    for r in range(2):
        assert torch.load(tmp_path / f"resume-rank{r}.pt", weights_only=False)["state"]["step"] == 4
    assert latest.read_text() == "step-4"  # mended by the resume
