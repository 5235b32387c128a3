"""The paper's diagnostics (pipeline/runtime/diagnostics.py): per-stage gradient norms and Figure 7's response std.

The fast tests check the measurements against direct computations on real models; the slow ones train on the
digits with real DALI and DeepSpeed (2 ranks on gloo) and read the study back from a real ``mlflow server``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import digits_study

from pipeline.config import ConfigError, DiagnosticsConfig, TrainConfig, load_config
from pipeline.models import build_model, list_models
from pipeline.runtime.diagnostics import (
    Diagnostics,
    GradNorms,
    branch_layers,
    response_layers,
    response_std,
    stage_groups,
)
from pipeline.runtime.metrics import MetricSums, is_timing

ROOT = Path(__file__).resolve().parents[1]


# -- what is measured ----------------------------------------------------------------------------------
def test_response_layers_are_every_3x3_conv_in_layer_order() -> None:
    cifar = [name for name, _ in response_layers(build_model("cifar_plain20", num_classes=10))]
    # The CIFAR stem is a 3x3 conv too: 1 + 3 stages x 3 blocks x 2 = 19, the paper's "20 layers" less the fc.
    assert len(cifar) == 19 and cifar[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert cifar[-1] == "layer3.2.conv2"
    # ImageNet: the 7x7 stem is not 3x3; a bottleneck has one 3x3 (conv2) per block.
    assert len(response_layers(build_model("resnet18", num_classes=1000))) == 16
    r50 = [name for name, _ in response_layers(build_model("resnet50", num_classes=1000))]
    assert len(r50) == 16 and all(n.endswith(".conv2") for n in r50)


def test_stage_groups_cover_every_parameter_once() -> None:
    model = build_model("cifar_resnet20", num_classes=10)
    groups = stage_groups(model)
    assert [name for name, _ in groups] == ["stem", "layer1", "layer2", "layer3", "fc"]
    ids = [id(p) for _, params in groups for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_plain20"])
def test_response_std_is_the_bn_output_before_the_addition_and_changes_nothing(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    model.train()
    model(x)  # running statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = response_std(model, x)
    stds = stats.layers
    assert model.training, "the module's mode is restored"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "measuring must not touch parameters or BN stats"
    # The first block by hand, in eval mode: conv -> BN is the response; the addition comes after it.
    model.eval()
    with torch.no_grad():
        stem = F.relu(model.bn1(model.conv1(x)))
        block = model.layer1[0]
        r1 = block.bn1(block.conv1(stem))
        r2 = block.bn2(block.conv2(F.relu(r1)))
    assert stds["conv1"] == pytest.approx(model.bn1(model.conv1(x)).std().item(), rel=1e-5)
    assert stds["layer1.0.conv1"] == pytest.approx(r1.std().item(), rel=1e-5)
    assert stds["layer1.0.conv2"] == pytest.approx(r2.std().item(), rel=1e-5)
    if name == "cifar_resnet20":
        assert r2.std().item() != pytest.approx((r2 + stem).std().item(), rel=1e-3)  # the addition would show
    # Per channel, then averaged: the spread between the channels' BN offsets left out.
    per_channel = r1.transpose(0, 1).reshape(r1.shape[1], -1).std(dim=1).mean().item()
    assert stats.per_channel["layer1.0.conv1"] == pytest.approx(per_channel, rel=1e-5)
    assert list(stats.per_channel) == list(stds) and not stats.branch  # basic blocks: no separate branch output
    # In chunks (how ImageNet's 1,000 images are measured): the same numbers as one batch.
    chunked = response_std(model, list(x.split(5)))
    assert chunked.layers == pytest.approx(stds, rel=1e-6)
    assert chunked.per_channel == pytest.approx(stats.per_channel, rel=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_bottleneck_nets_also_record_the_branch_output_that_meets_the_addition(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    branch = [n for n, _ in branch_layers(model)]
    blocks = [f"{s}.{i}" for s in model.stage_names for i in range(len(getattr(model, s)))]
    threes = {n for n, _ in response_layers(model)}
    if any(type(b).__name__ == "Bottleneck" for b in model.modules()):
        assert branch == [f"{b}.bn3" for b in blocks]  # one per block, in layer order
        assert all(b.replace(".bn3", ".conv2") in threes for b in branch)  # beside the middle 3x3's response
    else:
        assert branch == []


def test_bottleneck_branch_std_is_bn3s_output() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=10)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    block = model.layer1[0]
    seen: list[torch.Tensor] = []  # a hook returning a tensor would replace the output: append returns None
    handle = block.bn3.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    stats = response_std(model, x)
    handle.remove()
    assert stats.branch["layer1.0.bn3"] == pytest.approx(seen[0].std().item(), rel=1e-5)
    assert len(stats.branch) == 16 and len(stats.layers) == 16


def test_figure7_is_measured_at_every_evaluation_and_logged_per_step(tmp_path: Path) -> None:
    """Each measurement's per-stage means are metrics at its step (a line per stage in MLflow, not one dot);
    the per-layer JSON only at the end and at the chosen steps."""
    model = build_model("cifar_resnet20", num_classes=10)
    images = torch.randn(12, 3, 32, 32)
    loads = []
    cfg = DiagnosticsConfig(response_std=True, response_std_steps=[3], response_std_every=4)
    diag = Diagnostics(cfg, module=model, rank=0, out_dir=tmp_path, measurement=lambda: loads.append(1) or images)
    due = [s for s in range(1, 10) if diag.response_due(s, evaluated=s == 5)]
    assert due == [3, 4, 5, 8]
    logged = {}
    for step in due:
        path, metrics = diag.measure_responses(step=step, final=False)
        logged[step] = metrics
        assert (path is not None) == (step == 3)
    assert not diag.response_due(8, evaluated=True)  # measured once per step
    assert loads == [1]  # the image set is loaded once
    keys = {"response_std/stem", "response_std/layer1", "response_std_channel/layer3"}
    assert keys <= set(logged[4]) and logged[4] == logged[8]  # same model, same images, same numbers
    path, _ = diag.measure_responses(step=9, final=True)
    final = json.loads(path.read_text())
    assert path.name == "response_std.json" and final["step"] == 9
    assert set(final) == {"step", "layers", "per_channel", "branch"} and len(final["per_channel"]) == 19
    assert not Diagnostics(cfg, module=model, rank=1, out_dir=tmp_path).response_due(4)  # rank 0 only


def test_grad_norms_per_stage_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=10)
    F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    norms = GradNorms(model)
    squared = norms.squared()
    assert squared.dtype == torch.float64 and norms.names[1] == "grad_norm/layer1"
    want = {
        f"grad_norm/{stage}": math.sqrt(sum(p.grad.double().square().sum().item() for p in params))
        for stage, params in stage_groups(model)
    }
    # Summed over 2 ranks that hold the same averaged gradient: the mean over ranks is that gradient.
    got = norms.finish([2 * v for v in squared.tolist()], world_size=2)
    assert got == pytest.approx(want, rel=1e-6)  # float32 norms
    assert all(v > 0 for v in got.values())


def test_metric_sums_carry_extra_values_in_the_same_reduction() -> None:
    sums = MetricSums(torch.device("cpu"))
    logits = torch.eye(4) * 5
    sums.update(torch.tensor(0.5), logits, torch.tensor([0, 1, 2, 0]))
    m, extra = sums.reduce_with(torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert extra == [3.0, 4.0] and m == sums.reduce()
    assert m["count"] == 4 and m["top1_error"] == pytest.approx(25.0)


def test_diagnostics_are_off_by_default_and_do_not_change_the_experiment(tmp_path: Path) -> None:
    assert TrainConfig().diagnostics == DiagnosticsConfig(grad_norms=False, response_std=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    on = load_config(cfg, ["--diagnostics.grad_norms=true", "--diagnostics.response_std=true"])
    assert on.diagnostics.grad_norms and on.hash() == load_config(cfg).hash()  # checkpoints still match
    with pytest.raises(ConfigError, match="diagnostics.response_std = false"):
        DiagnosticsConfig(response_std_steps=[5])
    with pytest.raises(ConfigError, match="response_std_steps"):
        DiagnosticsConfig(response_std=True, response_std_steps=[0])
    with pytest.raises(ConfigError, match="diagnostics.response_std_every = -1"):
        DiagnosticsConfig(response_std=True, response_std_every=-1)
    with pytest.raises(ConfigError, match="response_std_every is set but diagnostics.response_std = false"):
        DiagnosticsConfig(response_std_every=10)


def test_every_study_turns_the_diagnostics_on() -> None:
    from pipeline.study.runner import member_config, read_study

    for path in sorted((ROOT / "configs/study").glob("*.toml")):
        study = read_study(path)
        cfg = member_config(study, study.members[0])
        assert cfg.diagnostics.grad_norms and cfg.diagnostics.response_std, path.name


# -- in training ---------------------------------------------------------------------------------------
def _torchrun(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", "--standalone", str(ROOT / "pipeline/train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_with_diagnostics_is_bitwise_the_training_without(tmp_path: Path) -> None:
    """2 ranks, 2 micro-batches per step: the norms come from the boundary's averaged gradient, the response std
    from rank 0's fixed batch, and neither changes a weight or a logged metric."""
    common = [
        "--config",
        str(ROOT / "configs/cpu/digits_resnet20.toml"),
        "--data.batch_size=16",
        "--distributed.grad_accum=2",
        "--schedule.max_steps=6",
        "--schedule.unit=step",
        "--schedule.milestones=[]",
        "--schedule.warmup=0",
        "--log_every=2",
        "--progress=false",
        "--tracking.enabled=false",
        f"--data.cache_dir={ROOT / '.cache/datasets'}",
        f"--checkpoint.uri={tmp_path}/ckpt",
    ]
    diag = ["--diagnostics.grad_norms=true", "--diagnostics.response_std=true", "--diagnostics.response_std_steps=[2]"]
    for run, extra in (("off", []), ("on", diag)):
        r = _torchrun([*common, f"--name={run}", f"--output_dir={tmp_path}/{run}", *extra], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

    def saved(run: str) -> tuple[list[dict], dict]:
        d = tmp_path / "ckpt" / run / "step-6"
        history = torch.load(d / "trainer-rank0.pt", weights_only=False)["history"]
        module = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return history, module

    (h_off, w_off), (h_on, w_on) = saved("off"), saved("on")
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_off)
    strip = [{k: v for k, v in row.items() if not is_timing(k) and not k.startswith("grad_norm/")} for row in h_on]
    assert strip == [{k: v for k, v in row.items() if not is_timing(k)} for row in h_off]
    stages = ["grad_norm/stem", "grad_norm/layer1", "grad_norm/layer2", "grad_norm/layer3", "grad_norm/fc"]
    logged = [row for row in h_on if "train_loss" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]
    for row in logged:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in stages), row
    assert not any(k.startswith("grad_norm/") for row in h_off for k in row)
    out = tmp_path / "on" / "diagnostics"
    final = json.loads((out / "response_std.json").read_text())
    early = json.loads((out / "response_std_step2.json").read_text())
    assert (final["step"], early["step"]) == (6, 2)
    assert list(final["layers"]) == list(early["layers"]) and len(final["layers"]) == 19
    assert all(v > 0 for v in final["layers"].values()) and final["layers"] != early["layers"]


@pytest.mark.slow
def test_zero1_reads_the_norms_from_its_partitions_and_gets_zero0s_numbers(tmp_path: Path) -> None:
    """ZeRO-1 moves the reduced gradients out of ``.grad`` into one slice per rank: the norms are the same."""
    norms = {}
    for stage in (0, 1):
        args = [
            "--config",
            str(ROOT / "configs/cpu/digits_resnet20.toml"),
            "--data.batch_size=16",
            "--schedule.max_steps=2",
            "--schedule.unit=step",
            "--schedule.milestones=[]",
            "--schedule.warmup=0",
            "--log_every=1",
            "--progress=false",
            "--tracking.enabled=false",
            "--diagnostics.grad_norms=true",
            f"--distributed.zero_stage={stage}",
            f"--data.cache_dir={ROOT / '.cache/datasets'}",
            f"--checkpoint.uri={tmp_path}/ckpt",
            f"--name=z{stage}",
            f"--output_dir={tmp_path}/z{stage}",
        ]
        r = _torchrun(args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        history = torch.load(tmp_path / f"ckpt/z{stage}/step-2/trainer-rank0.pt", weights_only=False)["history"]
        norms[stage] = [{k: v for k, v in row.items() if k.startswith("grad_norm/")} for row in history if "lr" in row]
    assert len(norms[0]) == 2 and all(v > 0 for row in norms[0] for v in row.values())
    for a, b in zip(norms[0], norms[1], strict=True):
        assert a.keys() == b.keys() and b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow
def test_digits_study_shows_grad_norms_in_mlflow_and_figure7_in_its_report(mlflow_server, tmp_path: Path) -> None:
    """The README's demo study at tiny size, read back from a real mlflow server as the UI and the report do."""
    from mlflow import MlflowClient

    from monitoring.report import main as report_main
    from pipeline.study.runs import load_study

    cmd, env = digits_study(
        tmp_path, mlflow_server.uri, "--tracking.system_metrics=false", "--tracking.log_model=false"
    )
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    client = MlflowClient(mlflow_server.uri)
    study = load_study(client, "digits_depth")  # the parent and its members, as the report finds them
    assert sorted(m.name for m in study.members) == ["plain20", "resnet20"]
    for m in study.members:
        for stage in ("layer1", "layer2", "layer3"):
            history = sorted(client.get_metric_history(m.run_id, f"grad_norm/{stage}"), key=lambda h: h.step)
            assert [h.step for h in history] == [2, 4, 6, 8, 10]  # every log_every
            assert all(h.value > 0 for h in history)
        assert "response_std/layer3" in m.final
        local = client.download_artifacts(m.run_id, "diagnostics/response_std.json", str(tmp_path / m.run_id))
        layers = json.loads(Path(local).read_text())["layers"]
        assert len(layers) == 19 and list(layers)[0] == "conv1"

    out = tmp_path / "report"
    assert report_main(["--study", "digits_depth", "--tracking-uri", mlflow_server.uri, "--out", str(out)]) == 0
    assert (out / "figure7.png").stat().st_size > 10_000
    page = (out / "report.md").read_text()
    assert "## Layer responses (Figure 7 layout)" in page and "![Figure 7 layout](figure7.png)" in page
    assert "plain-20" in page and "ResNet-20" in page
    logged = {a.path for a in client.list_artifacts(study.parent_run_id, "report")}
    assert "report/figure7.png" in logged
