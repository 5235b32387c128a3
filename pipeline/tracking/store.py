"""Where runs go and what describes them: the tracking URI, experiments, and run-context tags."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig

DEFAULT_URI = "sqlite:///mlflow.db"  # embedded store in the working directory; no server needed

# Network calls are retried by our own sender, with backoff and without blocking training. MLflow's
# default (7 retries with exponential backoff, 120 s timeout) would hold one call for minutes. And
# the client's "View run at" lines would be written to stdout from the sender thread, into the
# progress bar; the tracker logs the run's address itself.
_PROCESS_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def resolve_uri(cfg: TrackingConfig | None = None, *, uri: str = "") -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded sqlite store."""
    return uri or (cfg.uri if cfg else "") or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI


def configure_http_for_training() -> None:
    """Fail fast on network errors in this process (explicit environment settings win)."""
    for k, v in _PROCESS_DEFAULTS.items():
        os.environ.setdefault(k, v)


# MLflow 3's UI opens an experiment in its GenAI view (traces) unless told otherwise. Its 3.17 build chooses the view
# from the ``workflowType`` URL parameter (or the browser's last choice), and reads the experiment's
# ``mlflow.experimentKind`` tag only where that choice is switched off: the tag is set for those versions, and the
# addresses this project prints carry the parameter.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Model training"
_UI_VIEW = "workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run is in the UI, in its model-training view (a server), or the store and run id (embedded)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{_UI_VIEW}"
    return f"{uri} (run {run_id})"


def get_or_create_experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException  # heavy: mlflow loads only once a run is tracked

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process won the race
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def unique_run_name(client: Any, experiment_id: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... when a run of the experiment already has it: two runs of one
    name are indistinguishable in the UI's run list and compare view. (Reopening a run keeps its name.)"""
    if "'" in name:  # not expressible in a filter string; such a name is left as it is
        return name
    # LIKE's "_" matches any character: a superset of the names that can clash, checked exactly below.
    taken = {r.info.run_name for r in client.search_runs([experiment_id], f"attributes.run_name LIKE '{name}%'")}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


@functools.cache
def git_commit(path: str | None = None) -> str:
    """The commit of the code that runs (with "-dirty" when the tree has changes), or "unknown"."""
    where = path or str(Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def gpu_type() -> str:
    try:
        import torch  # heavy: only a run that records its GPU type needs it

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - a broken driver is reported as "cpu" rather than failing the run
        pass
    return "cpu"
