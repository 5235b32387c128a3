"""A depth study in MLflow: the queries the study runner (:mod:`pipeline.study`) and the report
(:mod:`monitoring.report`) share, and the study read back with its members' curves.

A study is a parent run tagged ``study = <name>`` and ``study_role = parent`` with its members as nested
runs (``mlflow.parentRunId``), each tagged ``study_member = <member name>``. A member may have several child
runs (a failed attempt, then one started from scratch, named ``<member>-2``); the newest finished run
counts, else the newest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

PARENT_ROLE = "parent"  # value of the "study_role" tag on a study's parent run
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class StudyNotFound(LookupError):
    """No parent run matches; the message says what was searched."""


@dataclass
class MemberRun:
    name: str  # the member's name in the study file, which is also its MLflow run name
    run_id: str
    status: str
    depth: int
    residual: bool
    shortcut: str
    dataset: str
    stem: str  # "cifar" or "imagenet": which of the paper's tables and figures it belongs to
    params: dict[str, str]
    tags: dict[str, str]
    final: dict[str, float]  # the last value of every metric
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]

    @property
    def label(self) -> str:
        return f"ResNet-{self.depth}" if self.residual else f"plain-{self.depth}"

    def param(self, key: str, default: Any = None) -> Any:
        """A flattened config value, parsed back from its string (numbers, booleans, lists)."""
        raw = self.params.get(key)
        if raw is None:
            return default
        if raw in ("True", "False"):  # runs logged before params spelled booleans in lower case
            return raw == "True"
        try:
            return json.loads(raw)
        except ValueError:
            return raw


@dataclass
class StudyRuns:
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    members: list[MemberRun]

    @property
    def datasets(self) -> set[str]:
        return {m.dataset for m in self.members}


def _all_experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def newest_parent(client: Any, study: str, experiment_ids: list[str]) -> Any | None:
    """The newest parent run of the study named ``study`` in these experiments, or None."""
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.study = '{study}' and tags.study_role = '{PARENT_ROLE}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def child_runs(client: Any, parent_run_id: str, experiment_id: str) -> list[Any]:
    """The runs nested under the parent (every attempt of every member), newest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )


def member_of(run: Any) -> str:
    """The member a child run belongs to: its ``study_member`` tag (runs logged before it existed: the run name)."""
    return run.data.tags.get("study_member") or run.info.run_name


def member_runs(client: Any, parent_run_id: str, experiment_id: str) -> dict[str, Any]:
    """Member name -> the run that counts for it: its newest finished run, else its newest."""
    by_member: dict[str, list[Any]] = {}
    for r in child_runs(client, parent_run_id, experiment_id):
        by_member.setdefault(member_of(r), []).append(r)
    return {name: _pick(runs) for name, runs in by_member.items()}


def find_parent(client: Any, study: str, *, experiment: str | None = None) -> Any:
    """The parent run, by run id or by study name (the newest parent of that name)."""
    if _RUN_ID.match(study):
        return client.get_run(study)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise StudyNotFound(f"experiment {experiment!r} does not exist at {client.tracking_uri}")
        ids = [exp.experiment_id]
    else:
        ids = _all_experiment_ids(client)
    parent = newest_parent(client, study, ids)
    if parent is None:
        raise StudyNotFound(
            f"no study named {study!r} at {client.tracking_uri}"
            f"{f' in experiment {experiment!r}' if experiment else ''}; pass the parent run id "
            f"or the study's name (python -m pipeline.study prints both)"
        )
    return parent


def _pick(runs: list[Any]) -> Any:
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return max(finished or runs, key=lambda r: r.info.start_time)


def load_study(
    client: Any,
    study: str,
    *,
    experiment: str | None = None,
    curves: tuple[str, ...] = ("train_top1_error", "val_top1_error"),
) -> StudyRuns:
    parent = find_parent(client, study, experiment=experiment)
    pid = parent.info.run_id
    members = []
    for name, r in member_runs(client, pid, parent.info.experiment_id).items():
        tags = r.data.tags
        if "depth" not in tags:
            continue  # a run that failed before it was described: nothing to report
        m = MemberRun(
            name=name,
            run_id=r.info.run_id,
            status=r.info.status,
            depth=int(tags["depth"]),
            residual=tags.get("residual") == "true",
            shortcut=tags.get("shortcut", ""),
            dataset=tags.get("dataset", ""),
            stem=tags.get("stem", "cifar"),
            params=dict(r.data.params),
            tags=dict(tags),
            final=dict(r.data.metrics),
        )
        for key in curves:
            if key in m.final:
                m.curves[key] = sorted((h.step, h.value) for h in client.get_metric_history(r.info.run_id, key))
        members.append(m)
    members.sort(key=lambda m: (m.residual, m.depth))
    return StudyRuns(
        name=parent.data.tags.get("study", parent.info.run_name),
        parent_run_id=pid,
        experiment_id=parent.info.experiment_id,
        tracking_uri=client.tracking_uri,
        members=members,
    )
