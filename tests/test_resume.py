"""Resume is explicit (--resume auto|never|URI), a finished run is not trained further, a schedule is a budget of
samples that a resume at another world size keeps (the same global batch) and a change of global batch is refused,
and a checkpoint of another model is refused. Real DALI, the real DeepSpeed engine (gloo), 2 ranks under torchrun
where the world size matters; the digits demo configs (configs/cpu/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_train import ROOT, torchrun, train_cli

from pipeline.core.stop import STOP_EXIT_CODE

CACHE = f"--data.cache_dir={ROOT / '.cache/datasets'}"
QUIET = ["--progress=false", "--tracking.enabled=false", CACHE]


RESNET20 = {"name": "cifar_resnet20", "depth": "20", "residual": "true", "shortcut": "A", "num_classes": "10"}
PLAIN20 = {**RESNET20, "name": "cifar_plain20", "residual": "false", "shortcut": "none"}


def _ck(tmp_path: Path, *, world: int = 1, batch: int = 16, accum: int = 1, model=RESNET20, **cfg):
    from pipeline.checkpoint import Checkpointer
    from pipeline.config import CheckpointConfig

    return Checkpointer(
        CheckpointConfig(uri=str(tmp_path / "ckpt"), **cfg),
        run_id="run",
        rank=0,
        world_size=world,
        config_hash="h",
        staging_dir=str(tmp_path / "staging"),
        record={
            "model": model,
            "config": {"data.batch_size": str(batch)},
            "global_batch": world * batch * accum,
            "batch_size": batch,
            "grad_accum": accum,
        },
    )


def _saved_at_step_4(tmp_path: Path, **kw) -> None:
    from test_checkpoint import FakeEngine

    ck = _ck(tmp_path, **kw)
    ck.save(FakeEngine(4.0), step=4, epoch=0, trainer_state={"step": 4})
    ck.close()


def test_resume_refuses_before_reading_any_checkpoint_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In-process, a world of one: each refusal is decided from the manifest (no file downloaded, nothing written)."""
    from test_checkpoint import FakeEngine

    from pipeline.checkpoint import CheckpointError

    _saved_at_step_4(tmp_path)
    run = tmp_path / "ckpt" / "run"
    manifest = json.loads((run / "step-4" / "manifest.json").read_text())
    assert manifest["model"] == RESNET20 and manifest["global_batch"] == 16
    before = _files(tmp_path / "ckpt")
    with pytest.raises(
        CheckpointError, match="holds cifar_resnet20 .* asks for cifar_plain20 .*residual: true vs false"
    ):
        _ck(tmp_path, model=PLAIN20).resume(FakeEngine())
    with pytest.raises(CheckpointError, match="global batch of 16 .* this run's is 8") as e:
        _ck(tmp_path, batch=8).resume(FakeEngine())
    assert "--distributed.grad_accum=2 or --data.batch_size=16" in str(e.value)
    with pytest.raises(CheckpointError, match=r"run run is finished: .*step-4 is at step 4.*--run_id=.*--resume=never"):
        _ck(tmp_path).resume(FakeEngine(), end_step=4)
    with pytest.raises(CheckpointError, match="at or past the end of this schedule"):
        _ck(tmp_path, resume=str(run / "step-4")).resume(FakeEngine(), end_step=3)
    assert _files(tmp_path / "ckpt") == before
    assert not (tmp_path / "staging" / "run").exists() or not any((tmp_path / "staging" / "run").rglob("*.pt"))

    # The same model and global batch under another config: resumed, the warning names the key.
    eng = FakeEngine()
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        other = _ck(tmp_path, world=2, batch=8)
        other.config_hash = "h2"
        assert other.resume(eng, end_step=5) == {"step": 4} and float(eng.w[0]) == 4.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("resumed run run at step 4 (epoch 0) from "), lines
    assert "hash h, now h2; changed: data.batch_size 16 -> 8" in lines[1], lines


def test_finished_run_whose_final_checkpoint_fails_its_checksum_is_named_not_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The final checkpoint is verified before "finished" is believed: a corrupt one is named and the run resumes
    from the one before it (to train the last steps again); with none left that verifies, no "finished" either."""
    from test_checkpoint import FakeEngine, _flip_byte

    from pipeline.checkpoint import CheckpointError

    ck = _ck(tmp_path)
    for step in (2, 4):
        ck.save(FakeEngine(float(step)), step=step, epoch=0, trainer_state={"step": step})
    ck.close()
    final = tmp_path / "ckpt" / "run" / "step-4" / "mp_rank_00_model_states.pt"
    _flip_byte(final, 10)
    eng = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert _ck(tmp_path).resume(eng, end_step=4) == {"step": 2} and float(eng.w[0]) == 2.0
    assert f"{final} fails its checksum" in caplog.text and "falling back to step-2" in caplog.text, caplog.text
    assert "is finished" not in caplog.text

    _flip_byte(tmp_path / "ckpt" / "run" / "step-2" / "mp_rank_00_model_states.pt", 10)
    (tmp_path / "ckpt" / "run" / "step-4" / "manifest.rejected.json").rename(final.parent / "manifest.json")
    with pytest.raises(CheckpointError) as e:
        _ck(tmp_path).resume(FakeEngine(), end_step=4)
    assert "no checkpoint of" in str(e.value) and "step-4, step-2" in str(e.value), e.value
    assert "is finished" not in str(e.value)


def _first_pipeline_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if " pipeline" in line)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _state(ckpt: Path, run: str, step: int) -> dict:
    return torch.load(ckpt / run / f"step-{step}" / "trainer-rank0.pt", weights_only=False)


@pytest.mark.slow
def test_finished_run_never_new_run_id_and_explicit_checkpoint(tmp_path: Path) -> None:
    """One process: a 4-step smoke run of an epoch config with milestones and warm-up (one override), then what a
    second start does with it under each --resume."""
    ckpt = tmp_path / "ckpt"
    common = [
        "--data.batch_size=32",
        "--schedule.max_steps=4",  # the config counts 10 epochs with milestones [7, 9] and a 1-epoch warm-up
        "--log_every=2",
        f"--checkpoint.uri={ckpt}",
        f"--output_dir={tmp_path}/out",
        *QUIET,
    ]
    r = train_cli(common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starts from scratch" in _first_pipeline_line(r.stderr)
    assert ", 4 steps (44 per epoch)" in r.stderr
    assert (ckpt / "digits_resnet20" / "latest").read_text() == "step-4"

    # The same command again: the run is finished; exit 2, one line naming the ways on, nothing written.
    before = _files(tmp_path)
    r = train_cli(common, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "run digits_resnet20 is finished" in line and "step-4 is at step 4" in line
    assert "--run_id=" in line and "--resume=never" in line
    staging = {k for k in _files(tmp_path) if k.startswith("out/staging")}
    assert {k: v for k, v in _files(tmp_path).items() if k not in staging} == {
        k: v for k, v in before.items() if k not in staging
    }

    # A longer schedule continues it (the config differs: the warning names the key).
    r = train_cli([*common, "--schedule.max_steps=6"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first = _first_pipeline_line(r.stderr)
    assert "resumed run digits_resnet20 at step 4 (epoch 0) from " in first, first
    assert f"{ckpt}/digits_resnet20/step-4" in first
    assert "schedule.max_steps 4 -> 6" in r.stderr

    # --resume never starts the run over: its checkpoints are set aside, kept.
    r = train_cli([*common, "--resume", "never"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run digits_resnet20 starts from scratch (checkpoint.resume = never)" in _first_pipeline_line(r.stderr)
    assert (ckpt / "digits_resnet20" / "step-6" / "manifest.set-aside.json").is_file()
    assert _state(ckpt, "digits_resnet20", 4)["step"] == 4

    # A new run id starts a run of its own; --resume=<step folder> starts a new run from that checkpoint.
    r = train_cli([*common, "--run_id=other"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run other starts from scratch" in _first_pipeline_line(r.stderr)
    step2 = ckpt / "other" / "step-4"
    r = train_cli([*common, "--run_id=third", f"--resume={step2}", "--schedule.max_steps=5"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed run third at step 4 (epoch 0) from {step2}" in _first_pipeline_line(r.stderr)
    assert _state(ckpt, "third", 5)["step"] == 5

    # A checkpoint of another network is refused, naming both: plain-20 has ResNet-20's shapes (option A).
    r = train_cli(
        [*common, "--model.name=cifar_plain20", "--run_id=plain", f"--resume={step2}", "--schedule.max_steps=5"],
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "holds cifar_resnet20" in r.stderr and "asks for cifar_plain20" in r.stderr
    assert not (ckpt / "plain").exists() or not any((ckpt / "plain").rglob("step-*"))


def _history(ckpt: Path, run: str, step: int) -> tuple[dict[int, float], dict]:
    state = _state(ckpt, run, step)
    return {int(row["step"]): row["lr"] for row in state["history"] if "lr" in row}, state


@pytest.mark.slow
def test_resume_on_another_world_size_keeps_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_server
) -> None:
    """2 ranks x 64 stopped at step 15 of an epoch schedule (3 epochs of 11 steps, warm-up 1 epoch, lr / 10 at
    epoch 2) and resumed on 1 rank x 128: the same steps, samples and lr at every step as 2 ranks uninterrupted,
    in the same MLflow run, whose world_size tag change is recorded beside it. 1 rank x 64 (another global batch)
    is refused with the keys that keep it; the finished run is refused."""
    from mlflow import MlflowClient

    ckpt = tmp_path / "ckpt"
    wrapper = str(ROOT / "tests/helpers/train_wrapper.py")
    common = [
        "--config",
        str(ROOT / "configs/cpu/digits_resnet20.toml"),
        "--schedule.epochs=3",
        "--schedule.milestones=[2]",
        "--schedule.warmup=1",
        "--log_every=1",
        f"--checkpoint.uri={ckpt}",
        *QUIET,
    ]
    tracked = [
        "--tracking.enabled=true",
        f"--tracking.uri={mlflow_server.uri}",
        "--tracking.experiment=moved",
        "--tracking.log_model=false",
        "--tracking.system_metrics=false",
        "--tracking.flush_interval_s=0.5",
    ]
    two = ["--data.batch_size=64", *common, *tracked]
    r = torchrun(
        [wrapper, *two, "--tracking.enabled=false", "--run_id=ref", f"--output_dir={tmp_path}/ref"], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert ", 33 steps (11 per epoch)" in r.stderr
    ref_lr, ref = _history(ckpt, "ref", 33)

    monkeypatch.setenv("TEST_SIGNAL_AT", "15")
    r = torchrun([wrapper, *two, "--run_id=moved", f"--output_dir={tmp_path}/moved"], cwd=tmp_path)
    assert f"exitcode  : {STOP_EXIT_CODE}" in r.stderr, r.stderr[-3000:]
    monkeypatch.delenv("TEST_SIGNAL_AT")
    assert (ckpt / "moved" / "latest").read_text() == "step-15"

    # One rank at the per-rank batch: half the global batch. Refused before anything is written.
    before = _files(ckpt)
    r = torchrun([wrapper, *two, "--run_id=moved", f"--output_dir={tmp_path}/moved"], cwd=tmp_path, nproc=1)
    assert "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    msg = next(x for x in r.stderr.splitlines() if x.startswith("error:"))
    assert "global batch of 128" in msg and "this run's is 64" in msg, msg
    assert "--distributed.grad_accum=2" in msg and "--data.batch_size=128" in msg, msg
    assert _files(ckpt) == before

    one = ["--data.batch_size=128", *common, *tracked, "--run_id=moved", f"--output_dir={tmp_path}/moved"]
    r = torchrun([wrapper, *one], cwd=tmp_path, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed run moved at step 15 (epoch 1)" in _first_pipeline_line(r.stderr)
    assert "data.batch_size 64 -> 128" in r.stderr  # the config hash differs; the warning names the key
    moved_lr, moved = _history(ckpt, "moved", 33)
    assert moved["step"] == ref["step"] == 33
    assert moved["samples"] == ref["samples"] == 33 * 128
    assert moved["world_sizes"] == [[0, 2], [15, 1]] and ref["world_sizes"] == [[0, 2]]
    assert moved_lr == pytest.approx(ref_lr, rel=1e-12)
    assert moved_lr[33] == pytest.approx(0.01) and moved_lr[5] < moved_lr[15] == pytest.approx(0.1)

    # Finished: a third start (2 ranks again, the same global batch) is refused on every rank; nothing written.
    before = _files(ckpt)
    r = torchrun([wrapper, *two, "--run_id=moved", f"--output_dir={tmp_path}/moved"], cwd=tmp_path)
    assert "exitcode  : 2" in r.stderr and "run moved is finished" in r.stderr, r.stderr[-3000:]
    assert "--run_id=" in r.stderr and "--resume=never" in r.stderr
    assert _files(ckpt) == before
    manifest = json.loads((ckpt / "moved" / "step-33" / "manifest.json").read_text())
    assert manifest["global_batch"] == 128 and manifest["model"]["name"] == "cifar_resnet20"

    # One MLflow run (the refused starts opened none): world_size is the current size, the change is recorded.
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("moved").experiment_id])
    assert run.info.run_id == moved["tracking_run_id"]
    assert run.data.tags["world_size"] == "1" and run.data.params["world_size"] == "2"
    assert run.data.tags["world_size_history"] == "2 ranks from step 0, 1 ranks from step 15"
    assert run.data.tags["global_batch"] == "128"
