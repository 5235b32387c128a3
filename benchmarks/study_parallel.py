"""Several members of a depth study training at once on one GPU, each its own training process.

The CIFAR networks leave most of an H100 idle (a step is a few milliseconds of small kernels), so
running members side by side raises total throughput. This is a launch mode, not a second trainer:

    python benchmarks/study_parallel.py run configs/study/cifar10_table6.toml --parallel 4 \\
        --only plain20,plain56,resnet20,resnet56 --report --report-out runs/reports/t6 [--section.key=value ...]

``run`` creates (or reopens) the study's parent MLflow run once, then starts up to ``--parallel``
``python -m pipeline.study STUDY --only MEMBER`` processes at a time, so every member goes through the
study runner, ``pipeline.train``, the Trainer, DeepSpeed, checkpoints and MLflow exactly as it would
one after another. Each process gets its own MASTER_PORT.

Where MLflow cannot be imported (the offline GPU machine may lack it), ``run --no-mlflow`` trains each
member with tracking off through ``pipeline.train.run`` and writes its history (the rows the tracker
would have logged) to ``HISTORY_DIR/<member>.json``; ``import`` later writes those into an MLflow store
as the same parent and child runs, so ``python -m monitoring.report`` works on them:

    python benchmarks/study_parallel.py import runs/t6-histories configs/study/cifar10_table6.toml \\
        --tracking-uri sqlite:///runs/t6.db --report-out runs/reports/t6

``project`` reads the timing probe of ``benchmarks/throughput.py --probe-dir`` (each member alone, then
all together) and prints the projected wall time of running them concurrently and one after another;
it exits 3 when the better of the two exceeds ``--limit-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/study_parallel.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitoring.report import main as report_main
from pipeline.config import TrainConfig, flatten, load_config, to_toml
from pipeline.models import model_spec
from pipeline.study.launch import Job, run_jobs
from pipeline.study.runner import Member, Study, close_parent, finished_children, member_config, open_parent, read_study
from pipeline.tracking import get_or_create_experiment, resolve_uri
from pipeline.train import run as train_run

ROOT = Path(__file__).resolve().parent.parent
BASE_PORT = 29600


def _members(study: Study, only: str | None) -> list[Member]:
    if not only:
        return list(study.members)
    names = only.split(",")
    known = {m.name: m for m in study.members}
    if missing := [n for n in names if n not in known]:
        raise SystemExit(f"error: --only names unknown member(s) {missing}; the study has {list(known)}")
    return [known[n] for n in names]


def _env(port: int) -> dict[str, str]:
    # A world of one with a fixed port: read_env would otherwise pick a free port in each process, and
    # processes starting in the same instant could pick the same one.
    return {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _launch(commands: list[tuple[str, list[str], Path]], *, parallel: int, deadline_s: float = 0.0) -> dict[str, int]:
    """Run (name, argv, log) commands through the study's launcher (pipeline.study.launch): at most ``parallel``
    at a time, each on its own cores; past ``deadline_s`` (0: none) the running ones checkpoint and stop."""
    port = BASE_PORT + (os.getpid() % 200) * 10
    jobs = [Job(name, argv, log=log, env=_env(port + i)) for i, (name, argv, log) in enumerate(commands, 1)]

    def started(job: Job, proc: subprocess.Popen) -> None:
        print(f"  started {job.name} (pid {proc.pid}, log {job.log})", flush=True)

    def ended(job: Job, rc: int, seconds: float) -> None:
        print(f"  {job.name}: {'finished' if rc == 0 else f'exit code {rc}'} after {seconds:.0f} s", flush=True)

    return run_jobs(jobs, parallel=parallel, deadline_s=deadline_s, on_start=started, on_exit=ended)


# -- run ----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    study = read_study(args.study)
    members = _members(study, args.only)
    # Every member resolves (a bad one fails the launch up front); the parent run records them all.
    configs = {m.name: member_config(study, m, overrides=overrides) for m in study.members}
    logs = Path(args.log_dir or f"runs/studies/{study.name}/logs")
    if args.no_mlflow:
        return _run_untracked(study, members, configs, args, overrides, logs)
    from mlflow import MlflowClient

    first = next(iter(configs.values()))
    uri = resolve_uri(first.tracking)
    client = MlflowClient(uri)
    # The parent first, so the member processes all reopen this one instead of racing to create their own.
    parent = open_parent(client, study, experiment=first.tracking.experiment, configs=configs)
    print(
        f"study {study.name}: parent run {parent} at {uri}; {len(members)} members, {args.parallel} at a time",
        flush=True,
    )
    cmds = [
        (
            m.name,
            [sys.executable, "-m", "pipeline.study", str(study.path), "--only", m.name, *overrides],
            logs / f"{m.name}.log",
        )
        for m in members
    ]
    t0 = time.monotonic()
    codes = _launch(cmds, parallel=args.parallel, deadline_s=args.deadline_s)
    exp_id = client.get_run(parent).info.experiment_id
    done = finished_children(client, parent, exp_id)
    ok = all(codes.get(m.name) == 0 for m in members)
    # Status and end time from the members, as pipeline.study sets them (a rerun does not lengthen the study).
    close_parent(client, parent, exp_id, [m.name for m in members], failed=not ok, stopped=False)
    print(f"\n{'member':<12} {'exit':>4} {'val top-1 err':>13}  (wall {time.monotonic() - t0:.0f} s)")
    for m in members:
        r = done.get(m.name)
        err = r.data.metrics.get("val_top1_error") if r else None
        print(f"{m.name:<12} {codes.get(m.name, '-'):>4} {err if err is None else format(err, '.2f'):>13}")
    if args.report:
        _report(study.name, uri, args.report_out)
    return 0 if ok else 1


def _run_untracked(
    study: Study,
    members: list[Member],
    configs: dict[str, TrainConfig],
    args: argparse.Namespace,
    overrides: list[str],
    logs: Path,
) -> int:
    hist = Path(args.history_dir or f"runs/studies/{study.name}/histories")
    hist.mkdir(parents=True, exist_ok=True)
    cmds = []
    for m in members:
        cfg = configs[m.name]
        cfg.tracking.enabled = False
        path = hist / f"{m.name}.toml"
        path.write_text(to_toml(cfg))
        cmds.append(
            (
                m.name,
                [sys.executable, str(Path(__file__).resolve()), "member", str(path), str(hist / f"{m.name}.json")],
                logs / f"{m.name}.log",
            )
        )
    print(
        f"study {study.name}: {len(members)} members, {args.parallel} at a time, MLflow off; histories in {hist}",
        flush=True,
    )
    t0 = time.monotonic()
    codes = _launch(cmds, parallel=args.parallel, deadline_s=args.deadline_s)
    print(f"\n{'member':<12} {'exit':>4} {'val top-1 err':>13}  (wall {time.monotonic() - t0:.0f} s)")
    for m in members:
        f = hist / f"{m.name}.json"
        err = json.loads(f.read_text())["final_val"].get("val_top1_error") if f.is_file() else None
        print(f"{m.name:<12} {codes.get(m.name, '-'):>4} {err if err is None else format(err, '.2f'):>13}")
    return 0 if all(c == 0 for c in codes.values()) else 1


def member(args: argparse.Namespace) -> int:
    """One member with tracking off: pipeline.train.run, then its history as JSON."""
    cfg = load_config(args.config)
    t0 = time.time()
    outcome = train_run(cfg)

    spec = model_spec(cfg.model.name, **cfg.model.overrides())
    out = {
        "config": cfg.to_dict(),
        "params": flatten(cfg),
        "tags": {**spec.tags(), "model": cfg.model.name},
        "history": outcome.history,
        "final_val": outcome.final_val,
        "exit_code": outcome.exit_code,
        "start_time": t0,
        "end_time": time.time(),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.history).write_text(json.dumps(out))
    return outcome.exit_code


# -- import -------------------------------------------------------------------------------------------------
def import_histories(args: argparse.Namespace) -> int:
    """Histories written by ``run --no-mlflow`` into an MLflow store, as the study runner would have."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    study = read_study(args.study)
    files = {p.stem: p for p in Path(args.history_dir).glob("*.json")}
    members = [m for m in study.members if m.name in files]
    if not members:
        raise SystemExit(f"error: no <member>.json of study {study.name} in {args.history_dir}")
    configs = {m.name: member_config(study, m) for m in study.members}
    client = MlflowClient(args.tracking_uri)
    experiment = next(iter(configs.values())).tracking.experiment
    parent = open_parent(client, study, experiment=experiment, configs=configs)
    exp_id = get_or_create_experiment(client, experiment)
    for m in members:
        data = json.loads(files[m.name].read_text())
        cfg = data["config"]
        dataset = cfg["data"]["source"] if cfg["data"]["source"] != "folder" else cfg["data"]["style"]
        tags = {
            "mlflow.parentRunId": parent,
            "study": study.name,
            "mlflow.source.name": "pipeline.train",
            "imported_from": str(files[m.name]),
            "dataset": dataset,
            "world_size": "1",
            **data["tags"],
        }
        run = client.create_run(exp_id, run_name=m.name, tags=tags, start_time=int(data["start_time"] * 1000))
        rid = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in data["params"].items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i : i + 100])
        ts = int(data["end_time"] * 1000)
        points = [
            Metric(k, float(v), ts, int(row["step"]))
            for row in data["history"]
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float))
        ]
        for i in range(0, len(points), 1000):
            client.log_batch(rid, metrics=points[i : i + 1000])
        client.log_batch(rid, tags=[RunTag("imported", "true")])
        client.set_terminated(
            rid, status="FINISHED" if data["exit_code"] == 0 else "FAILED", end_time=int(data["end_time"] * 1000)
        )
        print(f"  {m.name}: run {rid}, {len(points)} metric points", flush=True)
    client.set_terminated(parent, status="FINISHED")
    if args.report_out is not None:
        _report(study.name, args.tracking_uri, args.report_out)
    return 0


def _report(study: str, uri: str, out: str | None) -> None:
    report_main(["--study", study, "--tracking-uri", uri, *(["--out", out] if out else [])])


# -- project ------------------------------------------------------------------------------------------------
def project(rows: list[dict[str, Any]], *, startup_s: float = 20.0) -> dict[str, Any]:
    """Projected wall time of the probed members, concurrently and one after another.

    Concurrent: every member keeps the rate it had with all of them running (conservative: a member
    that finishes early frees the GPU for the rest), plus its evaluations at the same slowdown. In turn:
    each member at its rate alone. Both add the probe's start-up (at least ``startup_s``) and warm-up
    (compilation, which the real runs partly take from the compile cache)."""
    members = []
    for r in rows:
        if "alone_steps_s" not in r:
            continue
        steps = r["max_steps"]
        evals = steps // max(1, r["steps_per_epoch"] * r.get("eval_every", 1)) + 1
        # Start-up as the probe measured it (imports, data, engine), never below the floor given.
        members.append(
            {
                "name": r.get("name", r.get("model")),
                "steps": steps,
                "evals": evals,
                "alone": r["alone_steps_s"],
                "together": r["together_steps_s"],
                "eval_s": r["eval_s"],
                "warm_s": r["warmup_and_compile_s"],
                "start_s": max(startup_s, r.get("startup_s", 0.0)),
            }
        )
    if not members:
        raise ValueError("no probe rows (with alone_steps_s) in the input")
    warm = max(m["start_s"] + m["warm_s"] for m in members)
    concurrent = warm + max(
        m["steps"] / m["together"] + m["evals"] * m["eval_s"] * m["alone"] / m["together"] for m in members
    )
    sequential = sum(m["start_s"] + m["warm_s"] + m["steps"] / m["alone"] + m["evals"] * m["eval_s"] for m in members)
    best = "concurrent" if concurrent <= sequential else "sequential"
    return {
        "members": members,
        "concurrent_s": concurrent,
        "sequential_s": sequential,
        "best": best,
        "best_s": min(concurrent, sequential),
        "parallel": len(members) if best == "concurrent" else 1,
    }


def project_main(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in Path(args.probe).read_text().splitlines() if line.strip()]
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"probe of {r.get('name', r.get('model'))} failed: {r['error']}", flush=True)
    got = sum("alone_steps_s" in r for r in rows)
    if args.expect and got < args.expect and not errors:
        print(f"only {got} of {args.expect} probe processes reported (a crash leaves no row: see their logs)")
        return 2
    try:
        p = project(rows, startup_s=args.startup_s)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    together = f"{len(p['members'])} at once st/s"
    print(f"{'member':<20} {'steps':>6} {'alone st/s':>10} {together:>14} {'eval s':>7} {'warm-up s':>9}")
    for m in p["members"]:
        print(
            f"{m['name']:<20} {m['steps']:>6} {m['alone']:>10.1f} {m['together']:>14.1f} {m['eval_s']:>7.2f} "
            f"{m['warm_s']:>9.0f}"
        )
    print(
        f"projected wall: concurrent {p['concurrent_s'] / 60:.1f} min, one after another "
        f"{p['sequential_s'] / 60:.1f} min -> {p['best']} ({p['best_s'] / 60:.1f} min; limit {args.limit_s / 60:.1f} min)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(p))
    if errors:
        return 2
    return 0 if p["best_s"] <= args.limit_s else 3


# -- command line -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "run",
        help="train study members, several at a time",
        epilog="Other arguments (--section.key=value) override every member's config.",
    )
    r.add_argument("study")
    r.add_argument("--parallel", type=int, default=2, help="members training at the same time")
    r.add_argument("--only", help="comma-separated member names (default: all)")
    r.add_argument("--report", action="store_true", help="write the report (monitoring.report) when done")
    r.add_argument("--report-out", help="report folder (default runs/reports/<study>)")
    r.add_argument("--log-dir", help="one log per member (default runs/studies/<study>/logs)")
    r.add_argument("--no-mlflow", action="store_true", help="tracking off; histories as JSON for `import`")
    r.add_argument("--history-dir", help="--no-mlflow: where the histories go")
    r.add_argument("--deadline-s", type=float, default=0.0, help="stop every member (checkpoint first) after this")
    m = sub.add_parser("member", help=argparse.SUPPRESS)
    m.add_argument("config")
    m.add_argument("history")
    i = sub.add_parser("import", help="histories of `run --no-mlflow` into an MLflow store, then the report")
    i.add_argument("history_dir")
    i.add_argument("study")
    i.add_argument("--tracking-uri", required=True)
    i.add_argument("--report-out", help="also write the report here")
    j = sub.add_parser("project", help="projected wall time from a throughput.py probe")
    j.add_argument("probe", help="the probe's JSON lines")
    j.add_argument("--limit-s", type=float, default=570.0)
    j.add_argument(
        "--startup-s",
        type=float,
        default=20.0,
        help="floor of the start-up time per member "
        "(imports, data decode, engine build); the probe's own measurement counts when larger",
    )
    j.add_argument("--json", help="write the projection here")
    j.add_argument("--expect", type=int, default=0, help="probe processes that should have reported")
    args, rest = p.parse_known_args(argv)
    if args.cmd != "run" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "run":
        return run(args, rest)
    if args.cmd == "member":
        return member(args)
    if args.cmd == "import":
        return import_histories(args)
    return project_main(args)


if __name__ == "__main__":
    sys.exit(main())
