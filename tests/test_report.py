"""The depth-study report: tables in the paper's layout, the two-panel figure, the page, the artifacts.

One test fills a real MLflow server with a synthetic CIFAR-10 study (the paper's recipe for most
members) and runs the command line; the others check the table logic on in-memory runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from monitoring.paper import CIFAR10_SHA256
from monitoring.report import main
from monitoring.tables import comparison_table
from pipeline.study.runs import MemberRun, StudyRuns

CIFAR_RECIPE = {
    "data.batch_size": "128",
    "distributed.grad_accum": "1",
    "optim.lr": "0.1",
    "optim.reference_batch": "128",
    "optim.momentum": "0.9",
    "optim.weight_decay": "0.0001",
    "schedule.max_steps": "64000",
    "schedule.unit": "step",
    "schedule.milestones": "[32000, 48000]",
    "schedule.warmup_until_error": "0.0",
    "schedule.kind": "multistep",
    "schedule.gamma": "0.1",
    "schedule.warmup": "0",
    "model.num_classes": "10",
    "data.style": "cifar",
    "data.image_size": "32",
    "data.flip": "True",
    "optim.no_decay_bn_bias": "False",
    "precision.dtype": "bf16",
    "data.root_sha256": CIFAR10_SHA256,  # the paper configs' CIFAR-10 archive
}
IMAGENET_RECIPE = {
    "data.batch_size": "32",
    "distributed.grad_accum": "1",
    "optim.lr": "0.1",
    "optim.reference_batch": "256",
    "optim.momentum": "0.9",
    "optim.weight_decay": "0.0001",
    "schedule.max_steps": "0",
    "schedule.epochs": "120",
    "schedule.kind": "multistep",
    "schedule.unit": "epoch",
    "schedule.milestones": "[30, 60, 90]",
    "schedule.gamma": "0.1",
    "schedule.warmup": "0",
    "model.num_classes": "1000",
    "data.style": "imagenet",
    "data.augment": "paper",
    "data.scale": "[256, 480]",
    "data.image_size": "224",
    "data.flip": "True",
    "data.lighting": "0.1",
    "optim.no_decay_bn_bias": "False",
    "precision.dtype": "bf16",
}


def _curve(final: float, steps: int, every: int) -> list[tuple[int, float]]:
    return [(s, final + 60 * (math.exp(-5 * s / steps) - math.exp(-5))) for s in range(every, steps + 1, every)]


def _log_member(
    client: MlflowClient,
    exp: str,
    parent: str,
    name: str,
    *,
    depth: int,
    residual: bool,
    final: float,
    params: dict[str, str],
    dataset: str = "cifar",
    status: str = "FINISHED",
) -> str:
    run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, "study": "synthetic"})
    rid = run.info.run_id
    tags = {
        "depth": str(depth),
        "residual": str(residual).lower(),
        "shortcut": "A" if residual else "none",
        "dataset": dataset,
        "stem": "cifar",
        "world_size": "1",
    }
    ts = int(time.time() * 1000)
    metrics = [Metric("train_top1_error", v - 2, ts, s) for s, v in _curve(final, 64000, 800)]
    metrics += [Metric("val_top1_error", v, ts, s) for s, v in _curve(final, 64000, 4000)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i : i + 1000])
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()], tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(rid, status=status)
    return rid


def test_report_from_a_synthetic_cifar_study(mlflow_server, tmp_path: Path, capsys) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("synthetic")
    parent = client.create_run(
        exp, run_name="synthetic", tags={"study": "synthetic", "study_role": "parent"}
    ).info.run_id
    finals = {(False, 20): 9.5, (False, 56): 13.8, (True, 20): 8.6, (True, 56): 7.1, (True, 110): 6.5}
    for (residual, depth), final in finals.items():
        params = dict(CIFAR_RECIPE)
        if depth == 110:
            params["schedule.warmup_until_error"] = "80.0"
        if (residual, depth) == (True, 56):
            params["schedule.max_steps"] = "1000"  # not the paper's recipe: no paper number next to it
        _log_member(
            client,
            exp,
            parent,
            f"{'resnet' if residual else 'plain'}{depth}",
            depth=depth,
            residual=residual,
            final=final,
            params=params,
        )
    client.set_terminated(parent)

    out = tmp_path / "report"
    assert main(["--study", "synthetic", "--tracking-uri", mlflow_server.uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 6 layout" in printed
    lines = {line.split()[0]: line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()}
    assert lines["20"] == ["20", "9.50", "8.60", "8.75"]
    assert lines["56"] == ["56", "13.80", "7.10", "—"]
    # One ResNet-110 run: the paper's best of 5 beside it.
    assert lines["110"][:3] == ["110", "—", "6.50"] and "6.43 (best of 5)" in printed
    assert "ResNet-56: paper recipe except: lr x0.1 at steps [32000, 48000] of 1000 steps" in printed
    assert "Deliberate deviations from the paper's recipe in the compared runs: " in printed
    assert "bf16 autocast" in printed
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Figure 6 layout](figure.png)" in (out / "report.md").read_text()
    # The HTML page shows the same figure inline (MLflow's artifact viewer shows report.md's link as text).
    page = (out / "report.html").read_text()
    assert '<img src="data:image/png;base64,' in page and 'data-file="figure.png"' in page
    assert "<table>" in page and "<h1>Depth study <code>synthetic</code></h1>" in page
    assert sorted(a.path for a in client.list_artifacts(parent, "report")) == [
        "report/figure.png",
        "report/report.html",
        "report/report.md",
        "report/table.md",
    ]

    # By parent run id, without logging: the same table.
    again = ["--study", parent, "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "r2"), "--no-log"]
    assert main(again) == 0
    assert (tmp_path / "r2" / "table.md").read_text() == (out / "table.md").read_text()
    assert main(["--study", "nope", "--tracking-uri", mlflow_server.uri, "--no-log"]) == 2
    capsys.readouterr()

    # --json (what pipeline.study.demo reads): the same table and files, as one object.
    assert main(again + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parent_run_id"] == parent and summary["table"].splitlines()[0] in printed
    assert summary["page"] == str((tmp_path / "r2" / "report.md").resolve()) and Path(summary["figure"]).is_file()
    assert summary["figures"] == [summary["figure"]] and Path(summary["html"]).is_file()


def _member(
    depth: int,
    residual: bool,
    *,
    top1: float,
    top5: float,
    dataset: str,
    params: dict[str, str],
    stem: str,
    shortcut: str = "A",
) -> MemberRun:
    return MemberRun(
        name=f"{'resnet' if residual else 'plain'}{depth}",
        run_id="0" * 32,
        status="FINISHED",
        depth=depth,
        residual=residual,
        shortcut=shortcut if residual else "none",
        dataset=dataset,
        stem=stem,
        params=params,
        tags={"world_size": "8"},
        final={"val_top1_error": top1, "val_top5_error": top5},
    )


def test_imagenet_table_has_top5_and_the_10crop_paper_column() -> None:
    members = [
        _member(18, False, top1=28.1, top5=9.9, dataset="imagenet", params=IMAGENET_RECIPE, stem="imagenet"),
        _member(34, False, top1=29.0, top5=10.2, dataset="imagenet", params=IMAGENET_RECIPE, stem="imagenet"),
        _member(18, True, top1=28.0, top5=9.8, dataset="imagenet", params=IMAGENET_RECIPE, stem="imagenet"),
        _member(
            34, True, top1=25.5, top5=8.0, dataset="imagenet", params=IMAGENET_RECIPE, stem="imagenet", shortcut="B"
        ),
        _member(50, True, top1=23.9, top5=7.1, dataset="imagenet", params=IMAGENET_RECIPE, stem="imagenet"),
    ]
    table = comparison_table(StudyRuns("imagenet_depth", "p", "1", "uri", members))
    assert table.columns == [
        "layers",
        "plain top-1",
        "plain top-5",
        "plain top-1 (paper, 10-crop)",
        "ResNet top-1",
        "ResNet top-5",
        "ResNet top-1 (paper, 10-crop)",
    ]
    rows = {r[0]: r for r in table.rows}
    assert rows["18"] == ["18", "28.10", "9.90", "27.94", "28.00", "9.80", "27.88"]
    assert rows["34"] == ["34", "29.00", "10.20", "28.54", "25.50", "8.00", "—"]  # option B: Table 2 used A
    assert rows["50"] == ["50", "—", "—", "—", "23.90", "7.10", "—"]
    assert any("ResNet-34: paper recipe except: option B shortcuts" in n for n in table.notes)
    assert any("10 crops" in n for n in table.notes)


def test_digits_study_has_no_paper_column() -> None:
    params = dict(CIFAR_RECIPE, **{"schedule.max_steps": "0"})
    members = [
        _member(20, False, top1=3.0, top5=0.5, dataset="digits", params=params, stem="cifar"),
        _member(20, True, top1=2.5, top5=0.4, dataset="digits", params=params, stem="cifar"),
    ]
    table = comparison_table(StudyRuns("digits", "p", "1", "uri", members))
    assert table.columns == ["layers", "plain top-1", "ResNet top-1"]
    assert table.rows == [["20", "3.00", "2.50"]]
    assert "Table 6 layout" in table.title
    assert any("recipe differs" in n and "paper recipe except: digits data" in n for n in table.notes)


def test_table3_lists_the_recipe_beside_the_papers_numbers_and_prefers_10crop() -> None:
    from monitoring.tables import table3

    paper = dict(IMAGENET_RECIPE, **{"stride_in": "1x1", "block": "bottleneck"})
    modern = dict(paper, **{"data.augment": "rrc", "schedule.kind": "cosine", "stride_in": "3x3"})
    r50 = _member(50, True, top1=24.0, top5=7.3, dataset="imagenet", params=paper, stem="imagenet", shortcut="B")
    r50.final.update(eval_10crop_top1_error=22.9, eval_10crop_top5_error=6.8)
    r101 = _member(101, True, top1=22.0, top5=6.1, dataset="imagenet", params=modern, stem="imagenet", shortcut="B")
    r18 = _member(18, True, top1=28.0, top5=9.8, dataset="imagenet", params=IMAGENET_RECIPE, stem="imagenet")
    table = table3(StudyRuns("imagenet_depth", "p", "1", "uri", [r18, r101, r50]))
    assert table is not None and [r[0] for r in table.rows] == ["ResNet-50 B", "ResNet-101 B"]  # no 18 in Table 3
    assert table.rows[0] == ["ResNet-50 B", "22.90", "6.80", "10-crop", "22.85", "6.71", "paper recipe"]
    assert table.rows[1][1:6] == ["22.00", "6.10", "center crop", "21.75", "6.05"]
    assert table.rows[1][6] == 'paper recipe except: rrc augmentation, cosine schedule, stride on the 3x3 ("v1.5")'
    assert table3(StudyRuns("digits", "p", "1", "uri", [])) is None
