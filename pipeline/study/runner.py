"""The depth study: plain versus residual networks at every depth, one MLflow child run per member.

    python -m pipeline.study configs/study/cifar10_table6.toml                # members one after another
    python -m pipeline.study configs/study/imagenet_depth.toml --slurm        # a SLURM job array
    python -m pipeline.study configs/study/digits_depth.toml --schedule.epochs=2 --only plain20

A study file names the study, the train config its members start from (``base``), the settings they
share (``[shared]``, the same keys as a train config) and the members::

    name = "my_study"
    base = "configs/cpu/digits_resnet20.toml"
    nproc = 1                                  # processes per member (torchrun when > 1)
    [shared.schedule]
    max_steps = 64000
    [[members]]
    name = "plain20"
    model = "cifar_plain20"                    # model.name
    overrides = ["schedule.warmup_until_error=80"]   # optional, dotted as on the command line
    # config = "configs/..."                   # optional: a different base for this member

Every key is a documented field of :class:`Study` or :class:`Member`, read and checked like a train
config's keys (``pipeline.config.from_table``): an unknown key or a wrong type is an error naming it.
A member's config may itself name a ``base`` recipe (see ``pipeline.config``).

The study creates (or, when rerun, reopens) a parent MLflow run and runs each member as its own
training process, nested under it (``mlflow.parentRunId``). A rerun skips members whose run already
finished, and resumes the others from their checkpoints, into the same child run. One member's
failure does not stop the others. The parent's status and end time follow its members: FINISHED once all
finished, FAILED when one failed, ending with the last member (a rerun with nothing to do changes nothing).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    TrainConfig,
    apply_override,
    config_from_dict,
    doc,
    from_table,
    merge_tables,
    read_config_file,
    read_toml,
    to_toml,
)
from pipeline.core.stop import STOP_EXIT_CODE
from pipeline.study.launch import Job, last_progress, run_jobs
from pipeline.study.runs import PARENT_ROLE, member_runs, newest_parent
from pipeline.tracking import get_or_create_experiment, resolve_uri
from pipeline.tracking.datasets import dataset_name
from pipeline.tracking.store import git_commit

log = logging.getLogger("pipeline.study")

ROOT = Path(__file__).resolve().parents[2]  # the repository
SLURM_SCRIPT = "launch/slurm_depth_study.sh"
SUBMIT_ERROR_TAG = "submit_error"  # on the parent run: why the last --slurm submission failed


class SubmitError(RuntimeError):
    """sbatch refused the job array; the message carries its error."""


@dataclass
class Member:
    """One network of the study: a ``[[members]]`` table."""

    name: str = doc("", "the member's name: its MLflow child run, and its run name is <study>_<name>")
    model: str = doc("", 'model.name for this member; "" keeps the one of its base config')
    config: str = doc("", "a train config to start from instead of the study's base; \"\" = the study's base")
    overrides: list[str] = field(
        default_factory=list, metadata={"doc": 'dotted overrides as on the command line, e.g. "schedule.warmup=0"'}
    )
    nproc: int = doc(0, "processes for this member (torchrun when > 1); 0 = the study's nproc")


@dataclass
class Study:
    """A study file: what its members share, and the members."""

    name: str = doc(
        "", "the study's name: its MLflow parent run and its members' run-name prefix; default the file's name"
    )
    base: str = doc(
        "",
        "the train config every member starts from: a path as written, next to the study file "
        "or under the repository root",
    )
    experiment: str = doc("", 'MLflow experiment; "" = tracking.experiment of the members\' configs')
    nproc: int = doc(1, "processes per member (torchrun when > 1)")
    parallel: int = doc(
        1,
        "members trained at once on this machine, each pinned to its own share of the cores (its threads sized "
        "from them) with its output in runs/studies/<study>/logs/<member>.log; 1 = one after another",
    )
    shared: dict[str, Any] = field(
        default_factory=dict, metadata={"doc": "settings every member shares: tables and keys as in a train config"}
    )
    members: list[Member] = field(default_factory=list, metadata={"doc": "the networks, one [[members]] table each"})
    path: Path = field(default=Path(), init=False)  # the study file (read_study sets it); not a key of the file

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("the study lists no [[members]]: add one [[members]] table (with a name) per network")
        for i, m in enumerate(self.members):
            if not m.name:
                raise ConfigError(f"members[{i}] has no name")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ConfigError(f"member names must be unique; got {names}")
        if self.parallel < 1:
            raise ConfigError(f"parallel = {self.parallel}: must be >= 1 (1 trains the members one after another)")


@dataclass
class MemberOutcome:
    member: str
    state: str  # "finished", "skipped" (finished before), "failed", "stopped", "submitted"
    run_id: str | None = None
    val_top1_error: float | None = None
    exit_code: int | None = None


def _resolve_path(text: str, *, near: Path) -> Path:
    """A path as written, else relative to the study file, else to the repository root."""
    for candidate in (Path(text), near / text, ROOT / text):
        if candidate.exists():
            return candidate
    raise ConfigError(
        f"{text!r} does not exist (looked in the working directory, next to the study file and in {ROOT})"
    )


def read_study(path: str | Path) -> Study:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {str(p)!r} does not exist; studies live in configs/study/")
    raw = read_toml(p, what=f"study file {str(p)!r}")
    raw.setdefault("name", p.stem)
    try:
        study = from_table(Study, raw, noun="key")
    except ConfigError as e:
        raise ConfigError(f"study file {str(p)!r}: {e}") from e
    study.path = p
    return study


def member_config(
    study: Study, member: Member, *, overrides: list[str] | None = None, parent_run_id: str = ""
) -> TrainConfig:
    """The member's full train config: base, shared, member settings, command-line overrides, and the
    study's own keys (name, run name, study tag, parent run)."""
    base = member.config or study.base
    data = read_config_file(_resolve_path(base, near=study.path.parent)) if base else {}
    merge_tables(data, study.shared)
    if member.model:
        data.setdefault("model", {})["name"] = member.model
    for item in [*member.overrides, *(overrides or [])]:
        apply_override(data, item)
    data["name"] = f"{study.name}_{member.name}"  # checkpoint folder and output dir: unique per member
    tracking = data.setdefault("tracking", {})
    tracking.update(run_name=member.name, study=study.name, parent_run_id=parent_run_id)
    if study.experiment:
        tracking["experiment"] = study.experiment
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"study member {member.name!r}: {e}") from e


# -- MLflow ------------------------------------------------------------------------------------------
def _client(uri: str) -> Any:
    from mlflow import MlflowClient  # heavy: loaded only when the study talks to MLflow

    return MlflowClient(uri)


def open_parent(
    client: Any, study: Study, *, experiment: str, configs: dict[str, TrainConfig], create: bool = True
) -> str | None:
    """Find the study's newest parent run, or create it (with the study file as an artifact). A found parent
    is left as it is: :func:`run_study` marks it RUNNING only when members are about to run.
    ``create=False`` only looks (None when there is none yet) and changes nothing."""
    from mlflow.entities import Param  # heavy: loaded only when the study talks to MLflow

    if create:
        exp_id = get_or_create_experiment(client, experiment)
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        exp_id = exp.experiment_id
    found = newest_parent(client, study.name, [exp_id])
    if found is not None:
        return found.info.run_id
    if not create:
        return None
    first = next(iter(configs.values()))
    dataset = dataset_name(first.data)
    commit = git_commit()  # two git processes: asked once
    run = client.create_run(
        exp_id,
        run_name=study.name,
        tags={
            "study": study.name,
            "study_role": PARENT_ROLE,
            "dataset": dataset,
            "git_commit": commit,
            # What the UI's "Source" and "User" columns read, as on the members' runs.
            "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "mlflow.user": getpass.getuser(),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "pipeline.study",
            "mlflow.note.content": f"Depth study {study.name}: {', '.join(configs)}. Report: python -m monitoring.report --study {study.name}",
        },
    )
    parent = run.info.run_id
    params = {"study.file": str(study.path), "study.members": ",".join(configs), "study.base": study.base}
    for m in study.members:
        params[f"member.{m.name}.model"] = configs[m.name].model.name
    client.log_batch(parent, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_artifact(parent, str(study.path))
    return parent


def finished_children(client: Any, parent_run_id: str, experiment_id: str) -> dict[str, Any]:
    """Member name -> its newest FINISHED child run."""
    return {m: r for m, r in member_runs(client, parent_run_id, experiment_id).items() if r.info.status == "FINISHED"}


def parent_state(
    children: dict[str, Any], members: list[str], *, failed: bool = False, stopped: bool = False
) -> tuple[str, int | None]:
    """The parent's status and end time (ms) from its members' runs (``children``: :func:`member_runs`) and
    what this invocation saw (``failed``: a member's process failed, perhaps before its run existed;
    ``stopped``: the study was stopped). FAILED when a member failed, KILLED when one was stopped or has not
    run yet (``--only``), RUNNING while one still runs (a SLURM array), FINISHED when all finished. The end
    time is the last member's: a rerun that finds nothing to do does not lengthen the study."""
    runs = [children[m] for m in members if m in children]
    statuses = {r.info.status for r in runs}
    if failed or "FAILED" in statuses:
        status = "FAILED"
    elif stopped or "KILLED" in statuses:
        status = "KILLED"
    elif statuses & {"RUNNING", "SCHEDULED"}:
        status = "RUNNING"
    else:
        status = "FINISHED" if len(runs) == len(members) else "KILLED"
    ends = [r.info.end_time for r in runs if r.info.end_time]
    return status, (max(ends) if ends else None)


# A member's results the parent repeats as ``<member>/<key>``, so studies sort and compare at the parent's level.
SUMMARY_KEYS = ("val_top1_error", "val_top5_error", "eval_10crop_top1_error", "eval_10crop_top5_error")


def summarise_members(client: Any, parent: str, children: dict[str, Any]) -> dict[str, float]:
    """Log each member's final results on the parent (``<member>/val_top1_error``, top-5, and the 10-crop ones
    once ``pipeline.evaluate`` logged them); a value the parent already shows is not logged again. Returns them."""
    from mlflow.entities import Metric  # heavy: loaded only when the study talks to MLflow

    summary = {
        f"{name}/{key}": run.data.metrics[key]
        for name, run in children.items()
        for key in SUMMARY_KEYS
        if key in run.data.metrics
    }
    have = client.get_run(parent).data.metrics
    ts = int(time.time() * 1000)
    new = [Metric(k, v, ts, 0) for k, v in summary.items() if have.get(k) != v]
    if new:
        client.log_batch(parent, metrics=new)
    return summary


def close_parent(client: Any, parent: str, exp_id: str, members: list[str], *, failed: bool, stopped: bool) -> str:
    """Set the parent's status and end time from its members (:func:`parent_state`), after its summary of their
    results (:func:`summarise_members`); returns the status."""
    children = member_runs(client, parent, exp_id)
    summarise_members(client, parent, children)
    status, end_ms = parent_state(children, members, failed=failed, stopped=stopped)
    if status == "RUNNING":
        client.update_run(parent, status=status)
    else:
        client.set_terminated(parent, status=status, end_time=end_ms)
    return status


# -- running ----------------------------------------------------------------------------------------
def member_command(config_path: Path, *, nproc: int) -> list[str]:
    if nproc <= 1:
        return [sys.executable, "-m", "pipeline.train", "--config", str(config_path)]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [
        str(torchrun) if torchrun.exists() else "torchrun",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "pipeline" / "train.py"),
        "--config",
        str(config_path),
    ]


def slurm_command(manifest: Path, *, count: int, study: str) -> list[str]:
    return ["sbatch", f"--array=0-{count - 1}", f"--job-name={study}", SLURM_SCRIPT, str(manifest)]


def run_study(
    study: Study,
    *,
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    force: bool = False,
    slurm: bool = False,
    dry_run: bool = False,
    out_dir: str | Path | None = None,
    parallel: int = 0,
) -> list[MemberOutcome]:
    """Run (or submit) the members that have not finished yet; returns one outcome per member.
    ``parallel``: members at once on this machine (0: the study file's ``parallel``)."""
    overrides = list(overrides or [])
    members = [m for m in study.members if not only or m.name in only]
    if only and (missing := set(only) - {m.name for m in study.members}):
        raise ConfigError(
            f"--only names unknown member(s) {sorted(missing)}; the study has {[m.name for m in study.members]}"
        )
    # Resolve every member before touching MLflow: a bad member fails the study up front.
    configs = {m.name: member_config(study, m, overrides=overrides) for m in study.members}
    first = next(iter(configs.values()))
    uri = resolve_uri(first.tracking)
    experiment = first.tracking.experiment
    folder = Path(out_dir) if out_dir else Path("runs/studies") / study.name
    folder.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    parent = open_parent(client, study, experiment=experiment, configs=configs, create=not dry_run)
    if parent is None:
        print(
            f"study {study.name}: no parent run yet in experiment {experiment!r} at {uri} (dry run: none created)",
            flush=True,
        )
        done: dict[str, Any] = {}
        exp_id = ""
    else:
        exp_id = client.get_run(parent).info.experiment_id
        print(f"study {study.name}: parent run {parent} (experiment {experiment!r}) at {uri}", flush=True)
        done = {} if force else finished_children(client, parent, exp_id)

    outcomes: list[MemberOutcome] = []
    todo: list[tuple[Member, Path]] = []
    for m in members:
        if m.name in done:
            r = done[m.name]
            outcomes.append(MemberOutcome(m.name, "skipped", r.info.run_id, r.data.metrics.get("val_top1_error")))
            print(f"  {m.name}: already finished (run {r.info.run_id}): skipped", flush=True)
            continue
        cfg = member_config(
            study,
            m,
            overrides=[*overrides, *(["checkpoint.resume=never"] if force else [])],
            parent_run_id=parent or "",
        )
        # Members log to the store the parent is in, whatever the environment of their process says.
        cfg.tracking.uri = uri
        path = folder / f"{m.name}.toml"
        path.write_text(to_toml(cfg))
        todo.append((m, path))

    # The parent's status speaks for the members this invocation was asked for (all, or --only's): a study run
    # member by member, or by benchmarks/study_parallel.py's concurrent --only invocations, ends FINISHED.
    names = [m.name for m in members]
    if parent is not None and todo:
        client.update_run(parent, status="RUNNING")
    if slurm:
        if not todo and parent is not None:
            close_parent(client, parent, exp_id, names, failed=False, stopped=False)
        # The parent stays RUNNING while the array runs; rerunning the study once it is done closes it.
        try:
            submitted = _submit(study, todo, folder=folder, dry_run=dry_run)
        except SubmitError as e:
            if parent is not None and todo:
                # No array runs, so nothing would ever close the parent: it must not stay RUNNING.
                client.set_tag(parent, SUBMIT_ERROR_TAG, str(e)[:4000])
                client.set_terminated(parent, status="FAILED")
                print(f"study {study.name}: parent run {parent} marked FAILED: nothing was submitted", flush=True)
            raise
        if submitted and parent is not None and SUBMIT_ERROR_TAG in client.get_run(parent).data.tags:
            client.delete_tag(parent, SUBMIT_ERROR_TAG)  # an earlier failed submission's reason no longer holds
        return outcomes + submitted
    outcomes += _run_local(
        study,
        todo,
        parallel=parallel or study.parallel,
        folder=folder,
        dry_run=dry_run,
        client=client,
        parent=parent,
        exp_id=exp_id,
    )
    if not dry_run and parent is not None:
        close_parent(
            client,
            parent,
            exp_id,
            names,
            failed=any(o.state == "failed" for o in outcomes),
            stopped=any(o.state == "stopped" for o in outcomes),
        )
    return outcomes


def _member_state(rc: int) -> str:
    if rc == 0:
        return "finished"
    return "stopped" if rc in (STOP_EXIT_CODE, -2, -15, 130) else "failed"


def _run_local(
    study: Study,
    todo: list[tuple[Member, Path]],
    *,
    parallel: int,
    folder: Path,
    dry_run: bool,
    client: Any,
    parent: str | None,
    exp_id: str,
) -> list[MemberOutcome]:
    """Train the members on this machine, ``parallel`` at a time (pipeline.study.launch); a stopped member (SLURM
    time limit, preemption, Ctrl-C) starts no further one: rerun the study to continue."""
    jobs, names = [], [m.name for m, _ in todo]
    for i, (m, path) in enumerate(todo, 1):
        cmd = member_command(path, nproc=m.nproc or study.nproc)
        log_file = folder / "logs" / f"{m.name}.log" if parallel > 1 else None
        where = f" (log: {log_file})" if log_file else ""
        print(f"== [{i}/{len(todo)}] {m.name}: {shlex.join(cmd)}{where}", flush=True)
        jobs.append(Job(m.name, cmd, log=log_file, env=_child_env()))
    if dry_run or not jobs:
        return []
    if parallel > 1:
        print(f"   {min(parallel, len(jobs))} members at a time, each on its own cores", flush=True)

    def ended(job: Job, rc: int, seconds: float) -> None:
        state = _member_state(rc)
        how = "finished" if state == "finished" else f"{state} with exit code {rc}"
        rest = "; the other members go on" if state == "failed" else ""
        print(f"  {job.name}: {how} after {seconds:.0f} s{rest}", flush=True)

    def status(running: list[Job]) -> None:  # the terminal has no progress bar while members log to files
        states = [f"{job.name} {last_progress(job.log) or 'starting'}" for job in running if job.log]
        print(f"  running: {'; '.join(states)}", flush=True)

    codes = run_jobs(
        jobs,
        parallel=parallel,
        on_exit=ended,
        on_tick=status if parallel > 1 else None,
        stop_after=lambda rc: _member_state(rc) == "stopped",
    )
    outcomes = []
    for name in names:
        rc = codes.get(name, -1)
        if rc == -1:
            continue  # never started: the study was stopped first
        outcome = MemberOutcome(name, _member_state(rc), exit_code=rc)
        if parent is not None:
            outcome.run_id, outcome.val_top1_error = _child_result(client, parent, exp_id, name)
        outcomes.append(outcome)
    return outcomes


def _child_result(client: Any, parent: str, exp_id: str, member: str) -> tuple[str | None, float | None]:
    try:
        run = member_runs(client, parent, exp_id).get(member)
    except Exception:  # noqa: BLE001 - the summary is informative only
        return None, None
    if run is None:
        return None, None
    return run.info.run_id, run.data.metrics.get("val_top1_error")


def _submit(study: Study, todo: list[tuple[Member, Path]], *, folder: Path, dry_run: bool) -> list[MemberOutcome]:
    if not todo:
        print("nothing to submit: every member has finished", flush=True)
        return []
    # One resolved member config per line; array task i trains line i+1.
    manifest = folder / "members.txt"
    manifest.write_text("".join(f"{p.resolve()}\n" for _, p in todo))
    cmd = slurm_command(manifest.resolve(), count=len(todo), study=study.name)
    print(
        f"SLURM job array, one task per member ({', '.join(m.name for m, _ in todo)}):\n  {shlex.join(cmd)}", flush=True
    )
    if dry_run:
        return []
    if shutil.which("sbatch") is None:
        print("sbatch is not on this machine: not submitted (run the command above on the cluster)", flush=True)
        return []
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(res.stdout.strip() or res.stderr.strip(), flush=True)
    if res.returncode != 0:
        raise SubmitError(f"sbatch failed with exit code {res.returncode}: {res.stderr.strip()}")
    return [MemberOutcome(m.name, "submitted") for m, _ in todo]


def summary(outcomes: list[MemberOutcome]) -> str:
    lines = [f"{'member':<16} {'state':<10} {'val top-1':>9}  run id"]
    for o in outcomes:
        err = f"{o.val_top1_error:.2f}" if o.val_top1_error is not None else "—"
        lines.append(f"{o.member:<16} {o.state:<10} {err:>9}  {o.run_id or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments (--section.key=value) override every member's config.",
    )
    p.add_argument("study", help="study file (configs/study/*.toml)")
    p.add_argument("--only", help="comma-separated member names to run (default: all)")
    p.add_argument("--force", action="store_true", help="run finished members again, from scratch")
    p.add_argument(
        "--slurm",
        action="store_true",
        help=f"print (and, where sbatch exists, submit) a SLURM job "
        f"array of the unfinished members, using {SLURM_SCRIPT}",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="members trained at once on this machine, each on its own cores (default: the study's `parallel`)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands; train and submit nothing")
    p.add_argument("--report", action="store_true", help="write the report (monitoring.report) when done")
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        study = read_study(args.study)
        outcomes = run_study(
            study,
            overrides=rest,
            only=args.only.split(",") if args.only else None,
            force=args.force,
            slurm=args.slurm,
            dry_run=args.dry_run,
            parallel=args.parallel,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if outcomes:
        print("\n" + summary(outcomes))
    if args.report and not args.slurm and not args.dry_run:
        sys.stdout.flush()  # the report's lines follow the summary
        run_report(study.name, tracking_uri=_uri_of(study, rest))
    else:
        print(f"\nreport: python -m monitoring.report --study {study.name}")
    if any(o.state == "stopped" for o in outcomes):
        return STOP_EXIT_CODE
    return 1 if any(o.state == "failed" for o in outcomes) else 0


def run_report(
    study: str, *, tracking_uri: str, args: tuple[str, ...] = (), capture: bool = False
) -> subprocess.CompletedProcess:
    """``python -m monitoring.report --study STUDY`` with this interpreter: the report is a separate program, so
    the pipeline never imports it. Its stdout goes to this process's, or into the result with ``capture``."""
    cmd = [sys.executable, "-m", "monitoring.report", "--study", study, "--tracking-uri", tracking_uri, *args]
    return subprocess.run(cmd, env=_child_env(), stdout=subprocess.PIPE if capture else None, text=True, check=False)


def _child_env() -> dict[str, str]:
    """This environment, with the checkout importable wherever the child starts."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _uri_of(study: Study, overrides: list[str]) -> str:
    return resolve_uri(member_config(study, study.members[0], overrides=overrides).tracking)
