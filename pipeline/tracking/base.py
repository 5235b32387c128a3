"""The tracker interface the trainer sees, and the tracker that does nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pipeline.tracking.datasets import DatasetRecord

if TYPE_CHECKING:
    import numpy as np


class Tracker(Protocol):
    run_id: str | None

    def start(self, run_id: str | None = None) -> str | None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def resend_history(self, rows: list[dict[str, float]]) -> None: ...
    def log_inputs(self, datasets: list[DatasetRecord]) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_model(
        self, model: Any, *, name: str = "", input_example: np.ndarray | None = None, tags: dict[str, str] | None = None
    ) -> None: ...
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

    def log_model(
        self, model: Any, *, name: str = "", input_example: np.ndarray | None = None, tags: dict[str, str] | None = None
    ) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass
