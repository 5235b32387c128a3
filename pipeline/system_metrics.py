"""Node-level system metrics (CPU, memory, and per-GPU utilisation and memory through NVML).

One sampler runs on the local rank 0 of every node. Keys carry the node id
(``system/node_3/gpu_0_utilization_percentage``), so a straggling node stands out in the run's
system-metrics view next to the others. The step is whole seconds since the run started, a clock
all nodes share, which stays increasing across a resume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger("pipeline.tracking")


class _Nvml:
    """pynvml when a GPU and the library are there; otherwise nothing, silently (CPU machines)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no library, no driver or no GPU: no GPU metrics
            self.handles = []

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, h in enumerate(self.handles):
            try:
                util = self.nvml.nvmlDeviceGetUtilizationRates(h)
                mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            except Exception:  # noqa: BLE001 - a GPU that stops answering must not stop sampling
                continue
            out[f"gpu_{i}_utilization_percentage"] = float(util.gpu)
            out[f"gpu_{i}_memory_usage_megabytes"] = mem.used / 2**20
            out[f"gpu_{i}_memory_usage_percentage"] = 100.0 * mem.used / max(mem.total, 1)
        return out

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def sample_system(nvml: _Nvml | None = None) -> dict[str, float]:
    """One reading of this node; CPU utilisation is the average since the previous call."""
    vm = psutil.virtual_memory()
    out = {
        "cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
        "system_memory_usage_percentage": vm.percent,
    }
    if nvml is not None:
        out.update(nvml.sample())
    return out


class SystemMetricsSampler:
    """A daemon thread that hands ``emit(step, {"system/node_N/...": value})`` a reading every interval."""

    def __init__(
        self,
        *,
        node_id: int,
        interval_s: float,
        emit: Callable[[int, dict[str, float]], None],
        start_time_s: float | None = None,
    ) -> None:
        self.node_id = node_id
        self.interval_s = max(1.0, interval_s)
        self.emit = emit
        self.start_time_s = start_time_s if start_time_s is not None else time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"system-metrics-node{node_id}", daemon=True)

    def start(self) -> SystemMetricsSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        nvml = _Nvml()
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; it starts the window
        prefix = f"system/node_{self.node_id}/"
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    reading = sample_system(nvml)
                    step = int(time.time() - self.start_time_s)
                    self.emit(step, {prefix + k: v for k, v in reading.items()})
                except Exception as e:  # noqa: BLE001 - sampling is best effort
                    log.debug("system metrics sample failed: %s", e)
        finally:
            nvml.close()
