"""What a run and a study show in MLflow, against a real ``mlflow server``: the experiment's identity as
params (what the compare view's "Diff only" lists), the datasets read, the final model (named, with a
signature, optionally registered), unique run names, and the study parent's status and duration.

The fast tests drive the tracker and the study's parent bookkeeping directly; the slow one runs the
digits study (plain-20 and ResNet-20, a few steps each) and reads it back as the UI does, through REST.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from tiny import digits_study

from pipeline.config import DataConfig, TrackingConfig
from pipeline.data import build_source
from pipeline.data.folder import scan_split
from pipeline.models import build_model
from pipeline.study.runner import close_parent, parent_state
from pipeline.study.runs import member_runs
from pipeline.tracking import ModelCard, build_tracker
from pipeline.tracking.datasets import DatasetRecord, describe_split

REPO = Path(__file__).resolve().parents[1]
IDENTITY = ("depth", "residual", "shortcut", "stride_in", "block", "dataset", "train_samples", "val_samples")


def _cfg(uri: str, **kw: object) -> TrackingConfig:
    kw.setdefault("experiment", "records")
    return TrackingConfig(uri=uri, flush_interval_s=0.2, system_metrics=False, **kw)  # type: ignore[arg-type]


def _search(uri: str, body: dict) -> list[dict]:
    """POST /api/2.0/mlflow/runs/search: what the UI's run list and compare view read."""
    req = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/runs/search",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read()).get("runs", [])


# -- the tracker ------------------------------------------------------------------------------------
def test_a_resumed_run_keeps_each_params_first_value_and_gets_new_keys(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    first = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="p")
    run_id = first.start(None)
    first.log_params({"world_size": "2", "optim.lr": "0.1"})
    first.finish("KILLED")
    # Requeued on 4 ranks: MLflow refuses a param with a new value, so the first one stays (the tag shows 4).
    second = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="p")
    assert second.start(run_id) == run_id
    second.log_params({"world_size": "4", "optim.lr": "0.1", "added_later": "x"})
    second.set_tags({"world_size": "4"})
    second.finish("FINISHED")
    run = client.get_run(run_id)
    assert run.data.params == {"world_size": "2", "optim.lr": "0.1", "added_later": "x"}
    assert run.data.tags["world_size"] == "4" and run.info.status == "FINISHED"


def test_new_runs_of_a_taken_name_get_a_suffix_and_a_resume_keeps_its_name(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    ids = []
    for _ in range(3):
        t = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="digits_resnet20")
        ids.append(t.start(None))
        t.finish("FINISHED")
    assert [client.get_run(i).info.run_name for i in ids] == [
        "digits_resnet20",
        "digits_resnet20-2",
        "digits_resnet20-3",
    ]
    again = build_tracker(_cfg(mlflow_server.uri), is_main=True, run_name="digits_resnet20")
    assert again.start(ids[1]) == ids[1]
    again.finish("FINISHED")
    assert client.get_run(ids[1]).info.run_name == "digits_resnet20-2"
    exp = client.get_experiment_by_name("records").experiment_id
    assert len(client.search_runs([exp])) == 3


def test_dataset_inputs_and_a_named_registered_model_with_a_signature(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    tracker = build_tracker(_cfg(mlflow_server.uri, register_model=True), is_main=True, run_name="resnet20")
    run_id = tracker.start(None)
    records = [
        DatasetRecord("digits-train", "0123456789abcdef", "local", "/data/digits/train", 1437, "training"),
        DatasetRecord("digits-val", "fedcba9876543210", "local", "/data/digits/val", 360, "validation"),
    ]
    tracker.log_inputs(records)
    tracker.log_metrics(10, {"train_top1_error": 3.0, "lr": 0.1})
    tracker.log_metrics(10, {"val_top1_error": 1.5, "val_top5_error": 0.0})
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    model = build_model("cifar_resnet20", num_classes=10)
    card = ModelCard(step=10, input_example=example, metadata={"output": "logits"})
    tracker.log_model(model, card=card, tags={"checkpoint_uri": "s3://ckpt/run/step-00000010"})
    tracker.finish("FINISHED")

    run = client.get_run(run_id)
    inputs = {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"], d.dataset.profile)
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        "digits-train": ("0123456789abcdef", "training", '{"num_samples": 1437}'),
        "digits-val": ("fedcba9876543210", "validation", '{"num_samples": 360}'),
    }
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.name == "resnet20" and logged.source_run_id == run_id and logged.status == "READY"
    assert logged.tags["checkpoint_uri"] == "s3://ckpt/run/step-00000010"
    # The model is the run's result at step 10: its train and val metrics, each with the dataset it was measured on,
    # once (the run's history keeps one point per step), and the run lists it at that step.
    linked = {(m.key, m.step, m.dataset_name) for m in logged.metrics}
    assert linked == {
        ("train_top1_error", 10, "digits-train"),
        ("val_top1_error", 10, "digits-val"),
        ("val_top5_error", 10, "digits-val"),
    }
    assert len(client.get_metric_history(run_id, "val_top1_error")) == 1
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs] == [(logged.model_id, 10)]
    assert client.search_logged_models([run.info.experiment_id], filter_string="metrics.val_top1_error < 2")
    mlflow.set_tracking_uri(mlflow_server.uri)
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inp.type, inp.shape, out.shape) == (np.dtype("float32"), (-1, 3, 32, 32), (-1, 10))
    assert info.saved_input_example_info is not None
    assert info.metadata == {"output": "logits"}
    (version,) = client.search_model_versions("name = 'resnet20'")
    assert version.run_id == run_id and version.tags["checkpoint_uri"] == "s3://ckpt/run/step-00000010"
    assert version.source == f"models:/{logged.model_id}"  # the version shows that model's metrics and datasets


def test_dataset_digests_follow_the_file_index_not_its_place(tmp_path: Path) -> None:
    def tree(root: Path, extra: bool = False) -> str:
        for cls, n in (("a", 3), ("b", 2 + extra)):
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / "train" / cls / f"{i}.jpg").write_bytes(b"x")
        return str(root / "train")

    cfg = DataConfig(source="folder", root=str(tmp_path / "one"))

    def record(split_path: str) -> DatasetRecord:
        index = scan_split(split_path)
        return describe_split(cfg, split="train", source=SimpleNamespace(index=index, num_samples=len(index)))

    one, moved, bigger = (
        record(tree(tmp_path / "one")),
        record(tree(tmp_path / "two")),
        record(tree(tmp_path / "three", True)),
    )
    assert (one.name, one.num_samples, one.context, one.source_type) == ("cifar-train", 5, "training", "local")
    assert one.source == str(tmp_path / "one" / "train")
    assert one.digest == moved.digest != bigger.digest and len(one.digest) == 16

    synthetic = DataConfig(source="synthetic", batch_size=4, synthetic_batches=3)

    def generated(cfg: DataConfig) -> DatasetRecord:
        src = build_source(cfg, split="val", rank=0, world_size=1, device=torch.device("cpu"), seed=0, num_classes=10)
        return describe_split(cfg, split="val", source=src)

    a, b = generated(synthetic), generated(DataConfig(source="synthetic", batch_size=4, synthetic_batches=5))
    assert (a.name, a.num_samples, a.context, a.source_type) == ("synthetic-val", 12, "validation", "code")
    assert a.digest == generated(synthetic).digest != b.digest


# -- the study's parent run -----------------------------------------------------------------------------
def test_the_parent_reads_its_status_and_end_from_its_members(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("parents")
    parent = client.create_run(exp, run_name="s", start_time=1_000).info.run_id

    def child(member: str, status: str, end: int, name: str = "") -> str:
        tags = {"mlflow.parentRunId": parent, "study_member": member}
        rid = client.create_run(exp, run_name=name or member, tags=tags, start_time=end - 500).info.run_id
        client.set_terminated(rid, status=status, end_time=end)
        return rid

    child("plain20", "FINISHED", 5_000)
    failed = child("resnet20", "FAILED", 6_000)
    assert close_parent(client, parent, exp, ["plain20", "resnet20"], failed=False, stopped=False) == "FAILED"
    assert client.get_run(parent).info.end_time == 6_000
    # resnet20 run again from scratch: a new run, its name suffixed, the same member; now the study is done.
    child("resnet20", "FINISHED", 9_000, name="resnet20-2")
    runs = member_runs(client, parent, exp)
    assert {m: r.info.run_name for m, r in runs.items()} == {"plain20": "plain20", "resnet20": "resnet20-2"}
    assert failed not in {r.info.run_id for r in runs.values()}
    for _ in range(2):  # a rerun with nothing to do changes nothing
        assert close_parent(client, parent, exp, ["plain20", "resnet20"], failed=False, stopped=False) == "FINISHED"
        info = client.get_run(parent).info
        assert (info.status, info.end_time) == ("FINISHED", 9_000)
    # What this invocation saw counts too, and a member that never ran keeps the study from FINISHED.
    assert parent_state(runs, ["plain20", "resnet20"], failed=True)[0] == "FAILED"
    assert parent_state(runs, ["plain20", "resnet20"], stopped=True)[0] == "KILLED"
    assert parent_state(runs, ["plain20", "resnet20", "resnet32"]) == ("KILLED", 9_000)


# -- end to end: the digits study, read back as the UI reads it ----------------------------------------
@pytest.mark.slow
def test_study_members_show_their_identity_datasets_system_metrics_and_models(mlflow_server, tmp_path: Path) -> None:
    cmd, env = digits_study(
        tmp_path,
        mlflow_server.uri,
        "--tracking.system_metrics_interval_s=1",
        "--tracking.register_model=true",
        "--checkpoint.uri=ckpt",  # relative to the study's working directory
    )
    res = subprocess.run([*cmd, "--report"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("digits-demo").experiment_id
    (parent,) = client.search_runs([exp], "tags.study_role = 'parent'")
    pid = parent.info.run_id

    # The compare view of the two members: "Diff only" lists the params whose values differ.
    runs = _search(mlflow_server.uri, {"experiment_ids": [exp], "filter": f"tags.mlflow.parentRunId = '{pid}'"})
    params = {r["info"]["run_name"]: {p["key"]: p["value"] for p in r["data"]["params"]} for r in runs}
    assert sorted(params) == ["plain20", "resnet20"]
    plain, res20 = params["plain20"], params["resnet20"]
    differ = {k for k in plain.keys() | res20.keys() if plain.get(k) != res20.get(k)}
    assert {"residual", "shortcut", "model.name"} <= differ and "depth" not in differ
    assert (plain["residual"], res20["residual"], plain["shortcut"], res20["shortcut"]) == (
        "false",
        "true",
        "none",
        "A",
    )
    for p in (plain, res20):
        assert all(k in p for k in IDENTITY), sorted(set(IDENTITY) - p.keys())
        assert (p["depth"], p["block"], p["stride_in"], p["dataset"]) == ("20", "basic", "3x3", "digits")
        assert (p["global_batch"], p["world_size"]) == ("32", "1")
        assert int(p["train_samples"]) > int(p["val_samples"]) > 0
        # What a filter or a column picker finds: one spelling of booleans, no empty twin of a resolved param, and
        # the lr the run used (optim.lr scaled from reference_batch 128 to the global batch 32).
        assert (p["model.shortcut"], p["model.stride_in"]) == (p["shortcut"], p["stride_in"])
        assert [k for k, v in p.items() if v == "" and k.rsplit(".", 1)[-1] in p] == []
        assert (p["model.zero_init_residual"], p["tracking.register_model"], float(p["lr_effective"])) == (
            "false",
            "true",
            float(p["optim.lr"]) * 32 / 128,
        )
    run_tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    spelled = {v for values in [*params.values(), *run_tags] for v in values.values()}
    assert not spelled & {"True", "False"}
    assert sorted(plain) == sorted(res20)

    # A member read back: its datasets (with digests and sizes) and its model, named after it.
    member = member_runs(client, pid, exp)["resnet20"]
    contexts = {}
    for d in member.inputs.dataset_inputs:
        contexts[{t.key: t.value for t in d.tags}["mlflow.data.context"]] = d.dataset
    assert sorted(contexts) == ["training", "validation"]
    train, val = contexts["training"], contexts["validation"]
    assert (train.name, val.name) == ("digits-train", "digits-val")
    assert len(train.digest) == 16 and train.digest != val.digest
    assert json.loads(train.profile)["num_samples"] == int(res20["train_samples"])
    assert json.loads(val.profile)["num_samples"] == int(res20["val_samples"])
    assert json.loads(train.source)["uri"].endswith("/train")
    # MLflow's own system metrics, under its standard names with the node id; the step time every log_every steps
    # and the training TFLOP/s (no MFU on the CPU: no peak to measure it against).
    system = {k for k in member.data.metrics if k.startswith("system/")}
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= system, system
    step_times = client.get_metric_history(member.info.run_id, "step_time_s")
    assert sorted(m.step for m in step_times) == [2, 4, 6, 8, 10] and all(m.value > 0 for m in step_times)
    assert member.data.metrics["tflops_per_device"] > 0 and "mfu" not in member.data.metrics
    models = {m.name: m for m in client.search_logged_models([exp])}
    assert sorted(models) == ["plain20", "resnet20"]
    logged = models["resnet20"]
    assert logged.source_run_id == member.info.run_id
    mlflow.set_tracking_uri(mlflow_server.uri)
    signature = mlflow.models.get_model_info(f"models:/{logged.model_id}").signature
    assert [s.shape for s in signature.inputs.inputs] == [(-1, 3, 32, 32)]
    ckpt = logged.tags["checkpoint_uri"]
    assert ckpt == str(tmp_path / "ckpt/digits_depth_resnet20/step-10")  # absolute, though configured relative
    assert Path(ckpt, "manifest.json").is_file()
    (version,) = client.search_model_versions("name = 'resnet20'")
    assert version.tags["checkpoint_uri"] == ckpt and version.source == f"models:/{logged.model_id}"

    # The model is the run's result at its last step, measured on the validation split; a metric filter finds both.
    linked = {m.key: m for m in logged.metrics}
    final = linked["val_top1_error"]
    assert (final.step, final.value) == (10, member.data.metrics["val_top1_error"])
    assert (final.dataset_name, final.dataset_digest) == (val.name, val.digest)
    found = client.search_logged_models([exp], filter_string="metrics.val_top1_error <= 100")
    assert sorted(m.name for m in found) == ["plain20", "resnet20"]
    # How to feed it: a real preprocessed validation image as the example, the normalisation and class names.
    model_info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    local = mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}", dst_path=str(tmp_path / "model"))
    example = mlflow.models.Model.load(local).load_input_example(local)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    assert example.shape == (1, 3, 32, 32) and example.dtype == np.float32
    assert (
        (example >= (-mean / std)[:, None, None] - 1e-4) & (example <= ((255 - mean) / std)[:, None, None] + 1e-4)
    ).all()
    assert example.min() < -1.5 < 1.5 < example.max()  # dark background, bright strokes
    meta = model_info.metadata
    assert meta["input"]["normalisation"]["mean"] == list(mean) and meta["input"]["layout"] == "NCHW"
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["output"] == "logits"
    assert meta["checkpoint_uri"] == ckpt and len(meta["config_hash"]) == 16

    # The parent: each member's result, sortable at the study's level, and who ran which code.
    parent = client.get_run(pid)
    for name, run in member_runs(client, pid, exp).items():
        assert parent.data.metrics[f"{name}/val_top1_error"] == run.data.metrics["val_top1_error"]
        assert parent.data.metrics[f"{name}/val_top5_error"] == run.data.metrics["val_top5_error"]
    assert parent.data.tags["mlflow.source.git.commit"] and parent.data.tags["mlflow.user"]
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # The report as the artifact viewer shows it: HTML with its figures inline, their files beside it.
    report = {a.path for a in client.list_artifacts(pid, "report")}
    page = Path(client.download_artifacts(pid, "report/report.html", str(tmp_path / "page"))).read_text()
    figures = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="[^"]*" data-file="([^"]+)"', page)
    assert figures == ["figure.png", "figure7.png"] and page.count("<img") == 2
    assert {f"report/{f}" for f in figures} <= report

    # The parent: FINISHED, ending with its last member; a rerun with nothing to do leaves it as it was.
    ends = [r.info.end_time for r in member_runs(client, pid, exp).values()]
    before = client.get_run(pid).info
    assert (before.status, before.end_time) == ("FINISHED", max(ends))
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.count("already finished") == 2, res.stdout[-3000:]
    after = client.get_run(pid).info
    assert (after.status, after.start_time, after.end_time) == ("FINISHED", before.start_time, before.end_time)
