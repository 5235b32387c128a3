"""The tracker interface the trainer sees, and the tracker that does nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.tracking.datasets import DatasetRecord

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """What a logged model says about itself: its name ("" = the run's), the run's step it is the result of, an
    input example (a preprocessed batch, from which its signature is inferred), metadata (how to feed it, what it
    returns) and files logged with it (e.g. an ImageNet class index)."""

    name: str = ""
    step: int = 0
    input_example: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extra_files: tuple[str, ...] = ()


class Tracker(Protocol):
    run_id: str | None

    def start(self, run_id: str | None = None) -> str | None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def resend_history(self, rows: list[dict[str, float]]) -> None: ...
    def log_inputs(self, datasets: list[DatasetRecord]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_model(self, model: Any, *, card: ModelCard | None = None, tags: dict[str, str] | None = None) -> None: ...
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

    def resend_history(self, rows: list[dict[str, float]]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_inputs(self, datasets: list[DatasetRecord]) -> None:
        pass

    def log_model(self, model: Any, *, card: ModelCard | None = None, tags: dict[str, str] | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass
