"""python -m pipeline.evaluate: checkpoint lookup, the three test modes, exact counting across ranks,
and the errors a user meets (wrong checkpoint, wrong model, wrong mode)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datatree import write_ilsvrc_archives

from pipeline import evaluate as ev
from pipeline.models import build_model
from pipeline.tools.imagenet_tree import prepare_imagenet

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A prepared 3-class tree (4 train / 2 val images per class) and a config for it."""
    base = tmp_path_factory.mktemp("imagenet")
    archives = write_ilsvrc_archives(str(base / "archives"))
    p = archives["paths"]
    root = str(base / "tree")
    prepare_imagenet(root, train_tar=p["train"], val_tar=p["val"], devkit=p["devkit"], mean_samples=0, progress=False)
    config = base / "tiny.toml"
    config.write_text(f"""
name = "tiny"
progress = false
[model]
name = "resnet18"
num_classes = 3
[data]
source = "folder"
root = "{root}"
style = "imagenet"
image_size = 16
val_resize = 18
scale = [16, 24]
batch_size = 2
num_threads = 1
decoder = "cpu"
[precision]
dtype = "fp32"
""")
    return root, str(config)


def save_checkpoint(folder: Path, model: torch.nn.Module, *, step: int = 3, commit: bool = True) -> Path:
    """A checkpoint in the layout pipeline.checkpoint writes: <run>/step-N/{mp_rank_00_model_states.pt,
    manifest.json} and <run>/latest."""
    tag = folder / f"step-{step}"
    tag.mkdir(parents=True, exist_ok=True)
    path = tag / ev.MODEL_FILE
    torch.save({"module": model.state_dict(), "ds_version": "test", "optimizer": None}, path)
    if commit:
        data = path.read_bytes()
        manifest = {
            "format": 1,
            "tag": tag.name,
            "step": step,
            "epoch": 0,
            "world_size": 1,
            "files": [{"path": ev.MODEL_FILE, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
        }
        (tag / "manifest.json").write_text(json.dumps(manifest))
        (folder / "latest").write_text(tag.name)
    return tag


def biased_model(bias=(2.0, 1.0, 0.0)) -> torch.nn.Module:
    """Scores every image the same way: class 0 first, then 1, then 2."""
    model = build_model("resnet18", num_classes=3)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor(bias))
    return model


@pytest.mark.parametrize("mode", ["center", "10crop", "multiscale"])
def test_modes_count_every_image_once(tmp_path, imagenet, mode, capsys):
    root, config = imagenet
    run = tmp_path / "ckpt" / "run"
    save_checkpoint(run, biased_model())
    out = tmp_path / "result.json"
    code = ev.main(
        ["--config", config, "--checkpoint", str(run), "--mode", mode, "--scales", "16,20,24", "--json", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    # 6 validation images, 2 per class, all scored "class 0": top-1 right for 2 of 6, top-5 always.
    assert result["images"] == 6 and result["mode"] == mode
    assert result["top1_error"] == pytest.approx(100 * 4 / 6) and result["top5_error"] == 0.0
    assert result["checkpoint"] == str(run / "step-3")
    assert f"{mode}: top-1 error 66.67%  top-5 error 0.00%" in capsys.readouterr().out


class ChannelMeans(torch.nn.Module):
    """A 'network' whose 3 class scores are the image's channel means: easy to average by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_scores_average_softmax_over_views_and_scales():
    torch.manual_seed(0)
    model = ChannelMeans()
    crops = torch.randn(2, 10, 3, 4, 4)
    got = ev._scores(model, crops, "10crop")
    want = torch.stack(
        [torch.stack([crops[n, v].mean(dim=(1, 2)).softmax(0) for v in range(10)]).mean(0) for n in range(2)]
    )
    assert torch.allclose(got, want, atol=1e-6)
    # multiscale: image 0 and 1 differ in size at the second scale, so they run separately there
    scales = [[torch.randn(3, 4, 4), torch.randn(3, 4, 4)], [torch.randn(3, 6, 5), torch.randn(3, 5, 6)]]
    got = ev._scores(model, scales, "multiscale")
    want = torch.stack(
        [(scales[0][i].mean(dim=(1, 2)).softmax(0) + scales[1][i].mean(dim=(1, 2)).softmax(0)) / 2 for i in range(2)]
    )
    assert torch.allclose(got, want, atol=1e-6)


def test_checkpoint_lookup(tmp_path):
    model = biased_model()
    run = tmp_path / "run"
    save_checkpoint(run, model, step=2)
    save_checkpoint(run, model, step=5)
    assert ev.resolve_checkpoint(str(run))[0] == str(run / "step-5")  # latest
    assert ev.resolve_checkpoint(str(run / "step-2"))[0] == str(run / "step-2")  # a step folder
    (run / "latest").unlink()
    assert ev.resolve_checkpoint(str(run))[0] == str(run / "step-5")  # newest committed without `latest`
    bare = tmp_path / "bare"
    save_checkpoint(bare, model, commit=False)
    folder, manifest = ev.resolve_checkpoint(str(bare / "step-3"))  # DeepSpeed's files alone
    assert manifest is None and ev.load_model_state(folder)[0].keys() == model.state_dict().keys()
    with pytest.raises(ev.EvaluationError, match="no committed checkpoint found"):
        ev.resolve_checkpoint(str(tmp_path / "empty"))


def test_run_folder_never_loads_an_unverified_checkpoint(tmp_path, caplog):
    """As Checkpointer.resume does: only committed checkpoints whose model file verifies are taken from a
    run folder, newest first, whatever `latest` says; the others are skipped with a warning."""
    good, other = biased_model(), biased_model(bias=(0.0, 1.0, 2.0))
    run = tmp_path / "run"
    save_checkpoint(run, good, step=2)
    newer = save_checkpoint(run, other, step=5, commit=False)  # uploaded, never committed
    (run / "latest").write_text("step-5")  # hand-edited, or a torn commit elsewhere

    def loaded() -> tuple[str, torch.Tensor]:
        state, folder = ev.load_model_state(str(run))
        return folder, state["fc.bias"]

    with caplog.at_level(logging.WARNING):
        folder, bias = loaded()
    assert folder == str(run / "step-2") and torch.equal(bias, good.fc.bias)
    assert "names step-5, which has no manifest" in caplog.text
    # rejected by an earlier resume: the manifest was set aside
    save_checkpoint(run, other, step=5)
    (newer / "manifest.json").rename(newer / "manifest.rejected.json")
    assert loaded()[0] == str(run / "step-2")
    # `latest` holds no step name
    (run / "latest").write_text("garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert loaded()[0] == str(run / "step-2")
    assert "not a step name" in caplog.text
    # the newest committed checkpoint lost its model file: the older one is used, not "nothing found"
    save_checkpoint(run, other, step=5)
    assert loaded()[0] == str(run / "step-5")
    (newer / ev.MODEL_FILE).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        folder, bias = loaded()
    assert folder == str(run / "step-2") and torch.equal(bias, good.fc.bias)
    assert f"{newer / ev.MODEL_FILE} cannot be read" in caplog.text and "falling back to step-2" in caplog.text
    # `latest` exists but nothing is committed: an error that names the run, never an unverified load
    (newer / "manifest.json").unlink()
    (run / "step-2" / "manifest.json").unlink()
    with pytest.raises(
        ev.EvaluationError,
        match=f"--checkpoint {run}: .*latest exists but no committed checkpoint.*restore the checkpoint",
    ):
        ev.resolve_checkpoint(str(run))
    # a step folder named explicitly is still evaluated (DeepSpeed's files alone), with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ev.resolve_checkpoint(str(run / "step-2")) == (str(run / "step-2"), None)
    assert "used unverified" in caplog.text


def test_damaged_step_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    tag = save_checkpoint(run, biased_model())
    data = bytearray((tag / ev.MODEL_FILE).read_bytes())
    data[-5] ^= 0x01
    (tag / ev.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ev.EvaluationError, match="does not match its manifest.*fails its checksum"):
        ev.load_model_state(str(tag))


def test_checkpoint_storage_settings_come_from_the_config(
    tmp_path, imagenet, s3_bucket, s3_endpoint, monkeypatch, capsys
):
    from s3_server import aws_env

    from pipeline.core.storage import Storage

    root, config = imagenet
    for k, v in aws_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    local = save_checkpoint(tmp_path / "run", biased_model()).parent
    store = Storage(f"{s3_bucket}/ckpt/cfg-run")
    for f in local.rglob("*"):
        if f.is_file():
            store.put(f, str(f.relative_to(local)))
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    code = ev.main(["--config", config, "--checkpoint", store.uri, f"--checkpoint.endpoint_url={s3_endpoint}"])
    assert code == 0, capsys.readouterr().err
    assert f"{store.uri}/step-3" in capsys.readouterr().out


def test_checkpoint_from_s3(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    from s3_server import aws_env

    from pipeline.core.storage import Storage

    for k, v in aws_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    model = biased_model()
    local = save_checkpoint(tmp_path / "run", model).parent
    store = Storage(f"{s3_bucket}/ckpt/run")
    for f in local.rglob("*"):
        if f.is_file():
            store.put(f, str(f.relative_to(local)))
    state, folder = ev.load_model_state(store.uri)
    assert folder == f"{s3_bucket}/ckpt/run/step-3"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_compiled_model_keys_are_accepted():
    sd = {"_orig_mod.fc.bias": torch.zeros(3), "module.fc.weight": torch.zeros(3, 2)}
    assert set(ev._strip_prefixes(sd)) == {"fc.bias", "fc.weight"}


def test_errors_name_the_problem(tmp_path, imagenet, capsys):
    root, config = imagenet
    run = tmp_path / "run"
    tag = save_checkpoint(run, build_model("resnet34", num_classes=3))
    assert ev.main(["--config", config, "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{tag}/{ev.MODEL_FILE} does not fit model.name = 'resnet18'" in err
    (tag / ev.MODEL_FILE).write_bytes(b"damaged")
    assert ev.main(["--config", config, "--checkpoint", str(run)]) == 2
    assert "does not match its manifest" in capsys.readouterr().err
    assert ev.main(["--config", config, "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no committed checkpoint found" in capsys.readouterr().err
    (tag / "manifest.json").write_text("{not json")
    assert ev.main(["--config", config, "--checkpoint", str(tag)]) == 2
    err = capsys.readouterr().err
    assert f"manifest {tag / 'manifest.json'} is unreadable" in err and "Traceback" not in err
    assert ev.main(["--config", config, "--checkpoint", str(run), "--scales", "a,b"]) == 2
    assert "--scales 'a,b'" in capsys.readouterr().err
    cifar = tmp_path / "cifar.toml"
    cifar.write_text("[model]\nname = 'cifar_resnet20'\n[data]\nsource = 'digits'\n")
    assert ev.main(["--config", str(cifar), "--checkpoint", str(run), "--mode", "10crop"]) == 2
    assert "--mode 10crop needs data.style = 'imagenet'" in capsys.readouterr().err


def torchrun(args: list[str], nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize("nproc, mode", [(2, "10crop"), (3, "multiscale")])
def test_multi_rank_evaluation_matches_one_rank(tmp_path, imagenet, nproc, mode):
    root, config = imagenet
    torch.manual_seed(1)
    run = tmp_path / "run"
    save_checkpoint(run, build_model("resnet18", num_classes=3))  # random weights: errors depend on the image
    one = tmp_path / "one.json"
    assert (
        ev.main(["--config", config, "--checkpoint", str(run), "--mode", mode, "--scales", "16,24", "--json", str(one)])
        == 0
    )
    many = tmp_path / "many.json"
    proc = torchrun(
        [
            "pipeline/evaluate.py",
            "--config",
            config,
            "--checkpoint",
            str(run),
            "--mode",
            mode,
            "--scales",
            "16,24",
            "--json",
            str(many),
        ],
        nproc,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(many.read_text())
    assert b["world_size"] == nproc and a["images"] == b["images"] == 6  # 6 images over 3 ranks: 2 each
    for key in ("top1_error", "top5_error", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert f"{mode}: top-1 error" in proc.stdout
