"""Experiment tracking seam. Global rank 0 gets the MLflow tracker; every other rank a follower.

The trainer only sees ``Tracker``. ``start`` is a collective when tracking is enabled: rank 0 creates
(or reopens) the MLflow run and every rank receives its id, which the checkpoint then carries.
"""

from __future__ import annotations

from pipeline.config import TrackingConfig
from pipeline.tracking.base import ModelCard, NullTracker, Tracker
from pipeline.tracking.mlflow_tracker import FollowerTracker, MLflowTracker
from pipeline.tracking.store import DEFAULT_URI, get_or_create_experiment, resolve_uri

__all__ = [
    "DEFAULT_URI",
    "ModelCard",
    "NullTracker",
    "Tracker",
    "build_tracker",
    "get_or_create_experiment",
    "resolve_uri",
]


def build_tracker(
    cfg: TrackingConfig, *, is_main: bool, node_id: int = 0, is_local_main: bool | None = None, run_name: str = ""
) -> Tracker:
    """``is_main``: global rank 0. ``node_id``/``is_local_main`` place this rank's system metrics;
    ``run_name`` is used when tracking.run_name is empty (train.py passes the config name)."""
    if not cfg.enabled:
        return NullTracker()
    if is_main:
        return MLflowTracker(cfg, run_name=run_name, node_id=node_id)
    return FollowerTracker(cfg, node_id=node_id, is_local_main=bool(is_local_main))
