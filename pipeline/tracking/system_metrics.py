"""MLflow's own system metrics from the local rank 0 of every node, sent through the tracker's BatchSender.

MLflow's ``SystemMetricsMonitor`` samples CPU, memory, disk and network, and per-GPU utilisation, memory and power
(through nvidia-ml-py, where there is a GPU), averages them and names them with the node id, as its multi-node
runs do: ``system/node_1/gpu_0_utilization_percentage``, which MLflow's UI shows in its "System metrics" section.
Two of its habits do not suit a training job, and are replaced here:

- its loop asks the server for the run's status after every sample and stops for good at the first failed
  request; here it samples until stopped, whatever the server does;
- it sends ``log_batch`` from its own thread, synchronously, and ``finish()`` waits for that with no time limit;
  here the points join the tracker's queue (buffered through an outage, bounded by ``tracking.max_buffered``)
  and ``finish()`` waits a few seconds at most for the sampling thread.

The step counts sampling periods since the run started, on a clock every node shares; after a resume it
continues past the steps already logged (MLflow would ask the server for the last one).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mlflow.entities import Metric
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

if TYPE_CHECKING:
    from pipeline.tracking.sender import BatchSender

log = logging.getLogger("pipeline.tracking")


class _SenderLogger:
    """Stands in for MLflow's BatchMetricsLogger (``record_metrics``/``flush``): points go to the BatchSender."""

    def __init__(self, sender: BatchSender, run_id: str | None) -> None:
        self.sender = sender
        self.run_id = run_id  # None: the sender's run, which rank 0 may still be creating

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        self.sender.add_metrics(self.run_id, [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()])

    def flush(self) -> None:
        pass  # the sender sends on its own; the tracker closes it


class NodeSystemMetrics(SystemMetricsMonitor):
    """MLflow's monitor for one node, with the loop and the stop described in the module docstring."""

    def __init__(
        self, *, run_id: str | None, node_id: int, interval_s: float, uri: str, sender: BatchSender, start_time_s: float
    ) -> None:
        # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _NODE_ID override these, as MLflow documents.
        super().__init__(run_id, sampling_interval=interval_s, node_id=f"node_{node_id}", tracking_uri=uri)
        self.mlflow_logger = _SenderLogger(sender, run_id)
        period = float(self.sampling_interval) * int(self.samples_before_logging)
        self._logging_step = int(max(0.0, time.time() - start_time_s) // period)

    def monitor(self) -> None:
        while not self._shutdown_event.is_set():
            for _ in range(int(self.samples_before_logging)):
                try:
                    self.collect_metrics()
                except Exception as e:  # noqa: BLE001 - a sensor that fails once must not end sampling
                    log.debug("system metrics: a sample failed: %s", e)
                if self._shutdown_event.wait(float(self.sampling_interval)):
                    return
            try:
                self.publish_metrics(self.aggregate_metrics())
            except Exception as e:  # noqa: BLE001
                log.debug("system metrics: aggregating failed: %s", e)
                for m in self.monitors:
                    m.clear_metrics()

    def finish(self, timeout_s: float = 5.0) -> None:
        """Stop sampling and queue what the last, partial period collected (MLflow's monitor drops it, which
        leaves a run shorter than one period with no system metrics at all). Never waits on the network."""
        self._shutdown_event.set()
        thread, self._process = self._process, None
        if thread is None:
            return
        thread.join(timeout_s)
        if thread.is_alive():
            return  # a sensor hangs: its half-written samples are not worth a wait
        try:
            if any(m.metrics for m in self.monitors):
                self.publish_metrics(self.aggregate_metrics())
        except Exception as e:  # noqa: BLE001 - system metrics are never worth a failed finish
            log.debug("system metrics: the last period could not be aggregated: %s", e)


def start_node_metrics(
    *, run_id: str | None, node_id: int, interval_s: float, uri: str, sender: BatchSender, start_time_s: float
) -> NodeSystemMetrics | None:
    """Start sampling this node into the run; None (with a warning) when the monitor cannot be set up."""
    try:
        monitor = NodeSystemMetrics(
            run_id=run_id, node_id=node_id, interval_s=interval_s, uri=uri, sender=sender, start_time_s=start_time_s
        )
    except Exception as e:  # noqa: BLE001 - system metrics are never worth a failed run
        log.warning("MLflow system metrics cannot start on node %d (%s): training goes on without them", node_id, e)
        return None
    monitor.start()
    return monitor
