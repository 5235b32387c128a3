"""MLflow's own system metrics from the local rank 0 of every node, handed to the tracker's sender.

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

Knows nothing of the tracker: the tracker (``mlflow_tracker``) passes any ``MetricSink`` (its ``BatchSender``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mlflow.entities import Metric

log = logging.getLogger("pipeline.tracking")


class MetricSink(Protocol):
    """Where the sampled points go (the tracker's ``BatchSender``): queued for ``run_id``, never waiting."""

    def add_metrics(self, run_id: str | None, metrics: list[Metric]) -> None: ...


class _SinkLogger:
    """Stands in for MLflow's BatchMetricsLogger (``record_metrics``/``flush``): points go to the sink."""

    def __init__(self, sink: MetricSink, run_id: str | None) -> None:
        self.sink = sink
        self.run_id = run_id  # None: the sink's run, which rank 0 may still be creating

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric  # heavy: only a run that samples system metrics needs it

        ts = int(time.time() * 1000)
        self.sink.add_metrics(self.run_id, [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()])

    def flush(self) -> None:
        pass  # the sink sends on its own; the tracker closes it


class NodeSystemMetrics:
    """MLflow's monitor for one node (its sensors, aggregation and metric names), driven by the loop and the stop
    described in the module docstring instead of its own."""

    def __init__(
        self, *, run_id: str | None, node_id: int, interval_s: float, uri: str, sink: MetricSink, start_time_s: float
    ) -> None:
        # heavy (mlflow and its sensors): only a run that samples system metrics needs it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _NODE_ID override these, as MLflow documents.
        self.mlflow: Any = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, node_id=f"node_{node_id}", tracking_uri=uri
        )
        self.mlflow.mlflow_logger = _SinkLogger(sink, run_id)
        self.interval_s = float(self.mlflow.sampling_interval)
        self.samples = int(self.mlflow.samples_before_logging)
        # MLflow's step counter (publish_metrics advances it): one step per period since the run started.
        self.mlflow._logging_step = int(max(0.0, time.time() - start_time_s) // (self.interval_s * self.samples))
        self._shutdown = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.monitor, daemon=True, name="SystemMetricsMonitor")
        self._thread.start()

    def monitor(self) -> None:
        while not self._shutdown.is_set():
            for _ in range(self.samples):
                try:
                    self.mlflow.collect_metrics()
                except Exception as e:  # noqa: BLE001 - a sensor that fails once must not end sampling
                    log.debug("system metrics: a sample failed: %s", e)
                if self._shutdown.wait(self.interval_s):
                    return
            try:
                self.mlflow.publish_metrics(self.mlflow.aggregate_metrics())
            except Exception as e:  # noqa: BLE001
                log.debug("system metrics: aggregating failed: %s", e)
                for m in self.mlflow.monitors:
                    m.clear_metrics()

    def finish(self, timeout_s: float = 5.0) -> None:
        """Stop sampling and queue what the last, partial period collected (MLflow's monitor drops it, which
        leaves a run shorter than one period with no system metrics at all). Never waits on the network."""
        self._shutdown.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(timeout_s)
        if thread.is_alive():
            return  # a sensor hangs: its half-written samples are not worth a wait
        try:
            if any(m.metrics for m in self.mlflow.monitors):
                self.mlflow.publish_metrics(self.mlflow.aggregate_metrics())
        except Exception as e:  # noqa: BLE001 - system metrics are never worth a failed finish
            log.debug("system metrics: the last period could not be aggregated: %s", e)


def start_node_metrics(
    *, run_id: str | None, node_id: int, interval_s: float, uri: str, sink: MetricSink, start_time_s: float
) -> NodeSystemMetrics | None:
    """Start sampling this node into the run; None (with a warning) when the monitor cannot be set up."""
    try:
        monitor = NodeSystemMetrics(
            run_id=run_id, node_id=node_id, interval_s=interval_s, uri=uri, sink=sink, start_time_s=start_time_s
        )
    except Exception as e:  # noqa: BLE001 - system metrics are never worth a failed run
        log.warning("MLflow system metrics cannot start on node %d (%s): training goes on without them", node_id, e)
        return None
    monitor.start()
    return monitor
