"""The depth study: study files, member configs, SLURM submission, and a real two-member study.

The slow test runs two tiny members through a real MLflow server, renders the report from them and
reruns the study to check that finished members are skipped.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tiny import digits_study

from pipeline.config import ConfigError
from pipeline.study.runner import Member, Study, main, member_config, read_study

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs/study").glob("*.toml")))
def test_every_study_file_resolves_to_valid_member_configs(name: str) -> None:
    study = read_study(REPO / "configs/study" / f"{name}.toml")
    configs = [member_config(study, m) for m in study.members]
    assert len({c.name for c in configs}) == len(configs)
    for m, c in zip(study.members, configs, strict=True):
        assert c.tracking.run_name == m.name and c.tracking.study == study.name
        assert c.model.name == (m.model or c.model.name)


def test_paper_studies_list_the_paper_members() -> None:
    cifar = read_study(REPO / "configs/study/cifar10_table6.toml")
    assert [m.name for m in cifar.members] == [
        "plain20",
        "plain32",
        "plain44",
        "plain56",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet1202",  # the long member (Table 6's 7.93%)
    ]
    r110 = member_config(cifar, cifar.members[-2])
    assert r110.schedule.warmup_until_error == 80.0 and r110.schedule.max_steps == 64000
    imagenet = read_study(REPO / "configs/study/imagenet_depth.toml")
    assert [m.name for m in imagenet.members] == [
        "plain18",
        "plain34",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ]
    assert member_config(imagenet, imagenet.members[2]).model.shortcut == "A"  # Table 2 used option A


def test_member_config_precedence(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text(
        'name = "s"\nbase = "configs/cpu/digits_resnet20.toml"\nexperiment = "exp"\n'
        "[shared]\nlog_every = 7\n[shared.optim]\nlr = 0.2\n"
        '[[members]]\nname = "a"\nmodel = "cifar_plain20"\noverrides = ["optim.lr=0.3"]\n'
        '[[members]]\nname = "b"\n'
    )
    study = read_study(f)
    a = member_config(study, study.members[0], overrides=["--log_every=3"], parent_run_id="p" * 32)
    assert (a.model.name, a.optim.lr, a.log_every, a.data.source) == ("cifar_plain20", 0.3, 3, "digits")
    assert (a.name, a.tracking.experiment, a.tracking.parent_run_id) == ("s_a", "exp", "p" * 32)
    b = member_config(study, study.members[1])
    assert (b.model.name, b.optim.lr, b.log_every) == ("cifar_resnet20", 0.2, 7)


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "s"\n', "lists no [[members]]"),
        ('name = "s"\nbogus = 1\n[[members]]\nname = "a"\n', "unknown key"),
        ('[[members]]\nname = "a"\n[[members]]\nname = "a"\n', "unique"),
        ('[[members]]\nname = "a"\nmodel = "cifar_plain7"\n', "study member 'a': model.name"),
        ('parallel = 0\n[[members]]\nname = "a"\n', "parallel = 0: must be >= 1"),
    ],
)
def test_bad_study_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        study = read_study(f)
        for m in study.members:
            member_config(study, m)


def test_study_file_keys_are_documented_and_checked_like_config_keys(tmp_path: Path) -> None:
    for cls in (Study, Member):
        assert all(f.metadata.get("doc") for f in dataclasses.fields(cls) if f.init), cls.__name__
    f = tmp_path / "s.toml"
    f.write_text('nproc = "8"\n[[members]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="nproc = '8': expected an integer"):
        read_study(f)
    f.write_text('[[members]]\nname = "a"\nmodle = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'members\[0\]\.modle'"):
        read_study(f)


def test_slurm_prints_the_array_command_and_submits_only_with_sbatch(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no sbatch yet
    study = str(REPO / "configs/study/cifar10_table6.toml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([study, "--slurm", "--dry-run", f"--tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert "sbatch --array=0-9 --job-name=cifar10_table6 launch/slurm_depth_study.sh" in out
    assert "dry run: none created" in out
    assert MlflowClient(uri).get_experiment_by_name("cifar10-table6") is None

    assert main([study, "--slurm", f"--tracking.uri={uri}", "--only=resnet20,resnet110"]) == 0
    out = capsys.readouterr().out
    assert "sbatch --array=0-1 --job-name=cifar10_table6" in out and "not submitted" in out
    manifest = tmp_path / "runs/studies/cifar10_table6/members.txt"
    lines = manifest.read_text().splitlines()
    assert [Path(p).name for p in lines] == ["resnet20.toml", "resnet110.toml"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cifar10-table6")
    (parent,) = client.search_runs([exp.experiment_id])
    assert parent.data.tags["study_role"] == "parent" and parent.info.status == "RUNNING"
    assert f'parent_run_id = "{parent.info.run_id}"' in Path(lines[0]).read_text()

    # With sbatch on the PATH the same command is submitted (a stand-in sbatch records its arguments).
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "sbatch.args"}\necho "Submitted batch job 42"\n')
    sbatch.chmod(0o755)
    assert main([study, "--slurm", f"--tracking.uri={uri}", "--only=resnet20"]) == 0
    out = capsys.readouterr().out
    assert "Submitted batch job 42" in out
    assert (tmp_path / "sbatch.args").read_text().split()[:3] == [
        "--array=0-0",
        "--job-name=cifar10_table6",
        "launch/slurm_depth_study.sh",
    ]
    assert len(client.search_runs([exp.experiment_id])) == 1  # the same parent, reopened


@pytest.mark.slow
def test_two_member_study_nests_children_reports_and_skips_finished_members(mlflow_server, tmp_path: Path) -> None:
    cmd, env = digits_study(tmp_path, mlflow_server.uri, "--report")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("digits-demo")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("study_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and parent.info.status == "FINISHED"
    described = sorted(
        (r.info.run_name, r.data.tags["residual"], r.data.tags["depth"], r.info.status) for r in children
    )
    assert described == [("plain20", "false", "20", "FINISHED"), ("resnet20", "true", "20", "FINISHED")]
    assert all(r.data.tags["study"] == "digits_depth" for r in children)

    # The report rendered from them: printed, written, logged on the parent.
    assert "Table 6 layout: digits_depth" in res.stdout
    row = next(line.split() for line in res.stdout.splitlines() if line.strip().startswith("20 "))
    assert len(row) == 3 and all(float(v) >= 0 for v in row[1:])
    figure = tmp_path / "runs/reports/digits_depth/figure.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/figure.png",
        "report/figure7.png",  # the study turns diagnostics.response_std on
        "report/report.html",
        "report/report.md",
        "report/table.md",
    }

    # Figure 7 measured again afterwards, on the members' checkpoints, every member the same way.
    figure7 = [sys.executable, str(REPO / "benchmarks/figure7_from_checkpoints.py"), *cmd[3:4]]
    res7 = subprocess.run(
        [*figure7, "--checkpoints", str(tmp_path / "ckpt"), *(a for a in cmd[4:] if a != "--report")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res7.returncode == 0, res7.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in res7.stdout.splitlines()[1:]}
    assert set(rows) == {"plain20", "resnet20"} and all(r[1] == "step-10" and float(r[3]) > 0 for r in rows.values())

    # Rerun: both members finished, nothing trains again.
    res = subprocess.run(cmd[:-1], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("already finished") == 2 and "pipeline.train" not in res.stdout
    assert len(client.search_runs([exp.experiment_id])) == 3
