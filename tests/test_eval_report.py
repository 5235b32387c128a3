"""`python -m pipeline.evaluate --mode 10crop` on a study member's checkpoint adds its result to that member's
MLflow run (a real `mlflow server`), and the report shows it marked "10-crop" in Table 2's and Table 3's layouts.

The member is configs/imagenet/resnet34.toml (Table 2's and Table 3's ResNet-34 A), shrunk to a tiny ImageNet-style
tree on the CPU: a few steps at 16 pixels, trained through the real study runner and pipeline.train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from datatree import write_tree  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m <args>`` in ``cwd``; fails the test with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tiny(tree: Path, tmp: Path) -> list[str]:
    return [
        f"--data.root={tree}",
        "--model.num_classes=2",
        "--data.image_size=16",
        "--data.val_resize=18",
        "--data.scale=[16, 24]",
        "--data.batch_size=4",
        "--data.val_batch_size=4",
        "--data.num_threads=1",
        "--data.decoder=cpu",
        "--precision.dtype=fp32",
        "--model.compile=off",
        "--progress=false",
        f"--checkpoint.uri={tmp / 'ckpt'}",
        "--checkpoint.every_minutes=0",
    ]


@pytest.mark.slow
def test_10crop_evaluation_reaches_the_members_run_and_the_report(mlflow_server, tmp_path: Path) -> None:
    tree = tmp_path / "imagenet"
    write_tree(str(tree), {"train": {"n01": 8, "n02": 8}, "val": {"n01": 2, "n02": 2}}, size=(24, 24), ext=".JPEG")
    study = tmp_path / "study.toml"
    study.write_text(
        f'name = "tiny_imagenet"\nexperiment = "tiny-imagenet"\nnproc = 1\n\n'
        f'[[members]]\nname = "resnet34"\nconfig = "{REPO / "configs/imagenet/resnet34.toml"}"\n'
    )
    tiny = _tiny(tree, tmp_path)
    _run(
        [
            "pipeline.study",
            str(study),
            *tiny,
            "--schedule.epochs=1",
            "--schedule.milestones=[]",
            f"--output_dir={tmp_path / 'runs/{name}'}",
            f"--tracking.uri={mlflow_server.uri}",
            "--tracking.flush_interval_s=0.5",
            "--tracking.system_metrics=false",
        ],
        tmp_path,
    )
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("tiny-imagenet")
    (member,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("study_member") == "resnet34"]
    assert "eval_10crop_top1_error" not in member.data.metrics

    (latest,) = (tmp_path / "ckpt").glob("*/latest")
    out = tmp_path / "eval.json"
    _run(
        [
            "pipeline.evaluate",
            "--config",
            str(REPO / "configs/imagenet/resnet34.toml"),
            "--checkpoint",
            str(latest.parent),
            "--mode",
            "10crop",
            "--json",
            str(out),
            *tiny,
            f"--tracking.uri={mlflow_server.uri}",
        ],
        tmp_path,
    )
    result = json.loads(out.read_text())
    assert result["run_id"] == member.info.run_id and result["images"] == 4

    run = client.get_run(member.info.run_id)  # the member's own run, not a new one
    assert run.data.metrics["eval_10crop_top1_error"] == pytest.approx(result["top1_error"])
    assert run.data.metrics["eval_10crop_top5_error"] == pytest.approx(result["top5_error"])
    assert run.data.tags["eval_10crop_checkpoint"] == result["checkpoint"]
    assert len(client.search_runs([exp.experiment_id])) == 2  # parent and member: evaluate made none

    report = _run(
        [
            "monitoring.report",
            "--study",
            "tiny_imagenet",
            "--tracking-uri",
            mlflow_server.uri,
            "--out",
            str(tmp_path / "report"),
        ],
        tmp_path,
    )
    ours = f"{result['top1_error']:.2f}"
    table = (tmp_path / "report/table.md").read_text()
    assert f"{ours} (10-crop)" in table  # Table 2's layout: the 10-crop number, marked
    t3 = next(line for line in table.splitlines() if line.startswith("| ResNet-34 A"))
    cells = [c.strip() for c in t3.strip("|").split("|")]
    assert cells[1:6] == [ours, f"{result['top5_error']:.2f}", "10-crop", "25.03", "7.76"]
    # Tiny data, one epoch: the recipe column says what differs instead of comparing.
    assert cells[6].startswith("paper recipe except: ") and "1 epochs" in cells[6], cells[6]
    assert "Table 3 layout: tiny_imagenet" in report.stdout


@pytest.mark.slow
def test_evaluate_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    """plain-20 and ResNet-20 (option A) have the same shapes: the manifest's model record, not the weights, tells
    them apart. On 2 ranks every rank refuses alike (exit 2); the same model under another config is evaluated,
    with a warning naming the keys that differ."""
    cpu = REPO / "configs/cpu"
    common = [
        f"--data.cache_dir={REPO / '.cache/datasets'}",
        "--data.batch_size=32",
        "--progress=false",
        "--tracking.enabled=false",
    ]
    _run(
        [
            "pipeline.train",
            "--config",
            str(cpu / "digits_plain20.toml"),
            "--schedule.max_steps=2",
            *common,
            f"--checkpoint.uri={tmp_path / 'ckpt'}",
            f"--output_dir={tmp_path / 'out'}",
        ],
        tmp_path,
    )
    run = tmp_path / "ckpt" / "digits_plain20"
    evaluate = [str(REPO / "pipeline/evaluate.py"), "--checkpoint", str(run), "--no-log", *common]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--standalone", *evaluate, "--config", str(cpu / "digits_resnet20.toml")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # rank 0 only
    assert f"{run}/step-2 holds cifar_plain20" in line and "asks for cifar_resnet20" in line, line
    assert "residual: false vs true" in line and "model.name = 'cifar_plain20'" in line, line
    assert "top-1 error" not in proc.stdout

    ok = _run(
        ["pipeline.evaluate", *evaluate[1:], "--config", str(cpu / "digits_plain20.toml"), "--optim.lr=0.2"], tmp_path
    )
    assert "center: top-1 error" in ok.stdout
    assert "the config differs from the one that trained" in ok.stderr and "optim.lr 0.1 -> 0.2" in ok.stderr
