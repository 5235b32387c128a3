"""Experiment tracking seam. Global rank 0 gets the MLflow tracker; every other rank a follower.

The trainer only sees ``Tracker``. ``start`` is a collective when tracking is enabled: rank 0 creates
(or reopens) the MLflow run and every rank receives its id, which the checkpoint then carries.
"""

from __future__ import annotations

from typing import Any, Protocol

from pipeline.config import TrackingConfig
from pipeline.tracking.store import DEFAULT_URI, get_or_create_experiment, resolve_uri

__all__ = ["DEFAULT_URI", "NullTracker", "Tracker", "build_tracker", "get_or_create_experiment", "resolve_uri"]


class Tracker(Protocol):
    run_id: str | None

    def start(self, run_id: str | None = None) -> str | None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_model(self, model: Any) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What tracking.enabled = false gives every rank: every call does nothing."""

    run_id: str | None = None

    def start(self, run_id: str | None = None) -> str | None:
        self.run_id = run_id
        return run_id

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_model(self, model: Any) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def build_tracker(cfg: TrackingConfig, *, is_main: bool, node_id: int = 0, is_local_main: bool | None = None,
                  run_name: str = "") -> Tracker:
    """``is_main``: global rank 0. ``node_id``/``is_local_main`` place this rank's system metrics;
    ``run_name`` is used when tracking.run_name is empty (train.py passes the config name)."""
    if not cfg.enabled:
        return NullTracker()
    from pipeline.tracking.mlflow_tracker import FollowerTracker, MLflowTracker

    if is_main:
        return MLflowTracker(cfg, run_name=run_name, node_id=node_id)
    return FollowerTracker(cfg, node_id=node_id, is_local_main=bool(is_local_main))
