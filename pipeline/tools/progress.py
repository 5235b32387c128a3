"""The progress bar the dataset tools show on a terminal (tqdm), or one that shows nothing."""

from __future__ import annotations

from typing import Literal, Protocol

from tqdm.auto import tqdm


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, enabled: bool, desc: str, unit: Literal["B", "img"] = "img") -> ProgressBar:
    """A bar counting ``total`` images, or bytes (shown as KiB, MiB, ...); a silent one when not ``enabled``."""
    if not enabled:
        return _NoBar()
    if unit == "B":
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)
    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)
