"""The MLflow tracker of global rank 0, and the follower that every other rank runs.

Rank 0 creates (or, on resume, reopens) the run and broadcasts its id; the checkpoint carries it, so
a requeued job continues the same run. Every MLflow call goes through the background sender: the
training loop only appends to a queue, and an unreachable server costs it nothing.

Local rank 0 of every node (rank 0's too) adds MLflow's system metrics to the same run (``system_metrics``, fed through
the sender; it knows nothing of this module).
"""

from __future__ import annotations

import atexit
import copy
import getpass
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import TrackingConfig
from pipeline.core.distributed import broadcast_object
from pipeline.tracking.base import ModelCard, NullTracker
from pipeline.tracking.datasets import DatasetRecord
from pipeline.tracking.sender import MAX_BATCH, BatchSender
from pipeline.tracking.store import (
    configure_http_for_training,
    get_or_create_experiment,
    git_commit,
    gpu_type,
    resolve_uri,
    run_url,
    unique_run_name,
)
from pipeline.tracking.system_metrics import NodeSystemMetrics, start_node_metrics

if TYPE_CHECKING:
    from mlflow.entities import Metric

log = logging.getLogger("pipeline.tracking")

# The metrics a logged model is linked to, by prefix, and the dataset context each was measured on.
_LINKED = {"train_": "training", "val_": "validation"}
# The run's tags a logged model repeats: who made it, from which code.
_CONTEXT_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")

_MAX_PARAMS = 100  # MLflow's log_batch limits per request
_MAX_TAGS = 100


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def share_run(run_id: str | None, start_time_s: float | None) -> tuple[str | None, float | None]:
    """Rank 0's run id and start time on every rank (a collective when there are several ranks)."""
    return broadcast_object((run_id, start_time_s))


def _new_sender(cfg: TrackingConfig, uri: str, name: str, default_run_id: Any = lambda: None) -> BatchSender | None:
    from mlflow import MlflowClient  # heavy: mlflow loads only once a run is tracked

    configure_http_for_training()
    try:
        client = MlflowClient(uri)
    except Exception as e:  # noqa: BLE001 - e.g. an unwritable sqlite path: train without tracking
        log.warning("MLflow at %s cannot be opened (%s): this run is not tracked", uri, e)
        return None
    return BatchSender(
        client,
        uri=uri,
        max_buffered=cfg.max_buffered,
        flush_interval_s=cfg.flush_interval_s,
        name=name,
        default_run_id=default_run_id,
    )


def _clean_cpu_copy(model: Any) -> Any:
    """A CPU copy of the weights in a fresh module, safe to pickle and to upload later.

    The engine's module carries DeepSpeed's hooks and process-group references, which do not pickle;
    our models keep their ``spec``, from which an identical clean module is built. Other modules are
    deep-copied with their hooks removed.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    spec = getattr(model, "spec", None)
    if spec is not None:
        fresh = type(model)(spec)
    else:
        fresh = copy.deepcopy(model)
        for m in fresh.modules():
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                getattr(m, hooks, {}).clear()
    fresh.load_state_dict(state)
    return fresh.cpu().eval()


class MLflowTracker:
    """Global rank 0. Public methods never raise because of MLflow and never wait on the network,
    except ``start`` (at most ``tracking.start_timeout_s``) and ``finish`` (``tracking.finish_timeout_s``)."""

    def __init__(self, cfg: TrackingConfig, *, run_name: str = "", node_id: int = 0) -> None:
        self.cfg = cfg
        self.uri = resolve_uri(cfg)
        self.run_name = cfg.run_name or run_name
        self.node_id = node_id
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.start_time_s: float | None = None
        self.sender: BatchSender | None = None
        self._monitor: NodeSystemMetrics | None = None
        self._finished = False
        self._datasets: dict[str, DatasetRecord] = {}  # by context: what the model's metrics were measured on
        self._latest: dict[str, Metric] = {}  # each key's last point: the model links those of its step

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, run_id: str | None = None) -> str | None:
        """Create the run, or reopen ``run_id`` (a resume). A collective: every rank calls ``start``."""
        self.run_id = run_id or None  # a resume keeps its id even while the server is away
        self.sender = _new_sender(self.cfg, self.uri, "mlflow-sender", default_run_id=lambda: self.run_id)
        if self.sender is not None:
            done = self.sender.submit(lambda c: self._open_run(c, run_id), "start run")
            if not done.wait(self.cfg.start_timeout_s):
                log.warning(
                    "MLflow at %s did not answer within %.0f s (tracking.start_timeout_s): training "
                    "starts anyway; the run is %s once the server is back",
                    self.uri,
                    self.cfg.start_timeout_s,
                    f"reopened as {run_id}" if run_id else "created",
                )
        start = self.start_time_s if self.start_time_s is not None else time.time()
        self.run_id, start = share_run(self.run_id, start)
        if self.sender is not None and self.cfg.system_metrics:
            # self.run_id may still be None (the server is late): the sender then sends to the run once created.
            self._monitor = start_node_metrics(
                run_id=self.run_id,
                node_id=self.node_id,
                interval_s=self.cfg.system_metrics_interval_s,
                uri=self.uri,
                sink=self.sender,
                start_time_s=start,
            )
        atexit.register(self._at_exit)
        return self.run_id

    def _open_run(self, client: Any, resume_id: str | None) -> None:
        from mlflow.exceptions import MlflowException  # heavy: mlflow loads only once a run is tracked

        self.experiment_id = get_or_create_experiment(client, self.cfg.experiment)
        if resume_id:
            try:
                run = client.get_run(resume_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "MLflow run %s (from the checkpoint) does not exist at %s: starting a new run", resume_id, self.uri
                )
            else:
                marks = {
                    key: max(m.step for m in client.get_metric_history(resume_id, key)) for key in run.data.metrics
                }
                assert self.sender is not None
                self.sender.set_high_water(resume_id, marks)
                client.update_run(resume_id, status="RUNNING")
                self.experiment_id = run.info.experiment_id
                self.start_time_s = run.info.start_time / 1000
                self.run_id = resume_id
                log.info(
                    "MLflow: continuing run %s at %s (metrics up to step %d are kept)",
                    resume_id,
                    self.uri,
                    max(marks.values(), default=0),
                )
                return
        commit = git_commit()
        tags = {
            "mlflow.source.name": "pipeline.train",
            "mlflow.source.type": "LOCAL",
            "mlflow.user": getpass.getuser(),
            "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "git_commit": commit,
            "gpu_type": gpu_type(),
        }
        if self.cfg.study:
            tags["study"] = self.cfg.study
            # The member's name, whatever suffix its run name gets (a member rerun from scratch).
            tags["study_member"] = self.run_name
        if self.cfg.parent_run_id:
            tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        name = unique_run_name(client, self.experiment_id, self.run_name) if self.run_name else None
        run = client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.start_time_s = run.info.start_time / 1000
        self.run_id = run.info.run_id
        log.info(
            "MLflow: run %s in experiment %r: %s",
            run.info.run_name,
            self.cfg.experiment,
            run_url(self.uri, self.experiment_id, self.run_id),
        )

    def finish(self, status: str = "FINISHED") -> None:
        """Record the final state and send what is buffered, waiting at most tracking.finish_timeout_s."""
        if self._finished or self.sender is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
        self._submit(lambda c: c.set_terminated(self._rid(), status=status), f"set status {status}")
        self._finished = True
        t0 = time.monotonic()
        if self.sender.close(self.cfg.finish_timeout_s):
            log.info(
                "MLflow: run %s %s (%d metric points in %d batches, %.1f s to flush)",
                self.run_id,
                status.lower(),
                self.sender.points_sent,
                self.sender.batches_sent,
                time.monotonic() - t0,
            )
        else:
            points, ops = self.sender.pending
            log.warning(
                "MLflow at %s did not take the last data within %.0f s (tracking.finish_timeout_s): "
                "%d metric points and %d calls (including the final status %s) were not sent",
                self.uri,
                self.cfg.finish_timeout_s,
                points,
                ops,
                status,
            )

    def _at_exit(self) -> None:
        # An exception path that skipped finish(): still try to deliver what is buffered, briefly.
        if not self._finished and self.sender is not None:
            self._finished = True
            if self._monitor is not None:
                self._monitor.finish()
            self.sender.close(min(10.0, self.cfg.finish_timeout_s))

    # -- logging ------------------------------------------------------------------------------------
    def _rid(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run")  # permanent: the run could not be created
        return self.run_id

    def _submit(self, fn: Any, what: str) -> None:
        if self.sender is not None and not self._finished:
            self.sender.submit(fn, what)

    def log_params(self, params: dict[str, str]) -> None:
        """Log the params the run does not have yet. MLflow params are immutable: a resumed run keeps the
        first value of each (a changed one is named in the log; its tag, where there is one, shows the
        current value), and a key added since is logged."""
        wanted = {k: str(v)[:6000] for k, v in params.items()}
        self._submit(lambda c: self._log_new_params(c, wanted), f"log {len(wanted)} params")

    def _log_new_params(self, client: Any, wanted: dict[str, str]) -> None:
        from mlflow.entities import Param  # heavy: mlflow loads only once a run is tracked

        have = client.get_run(self._rid()).data.params
        changed = sorted(k for k, v in wanted.items() if k in have and have[k] != v)
        if changed:
            log.info(
                "MLflow: run %s keeps its first value of %s (params cannot change): %s",
                self.run_id,
                ", ".join(changed),
                ", ".join(f"{k} {have[k][:40]} -> {wanted[k][:40]}" for k in changed[:5]),  # a short log line
            )
        items = [Param(k, v) for k, v in wanted.items() if k not in have]
        for chunk in _chunks(items, _MAX_PARAMS):
            client.log_batch(self._rid(), params=chunk)

    def log_inputs(self, datasets: list[DatasetRecord]) -> None:
        """The run's datasets (MLflow's Datasets column), each with its context: training or validation."""
        from mlflow.entities import Dataset, DatasetInput, InputTag  # heavy: mlflow loads only once a run is tracked
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        self._datasets.update({d.context: d for d in datasets})
        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest,
                    source_type=d.source_type,
                    source=json.dumps({"uri": d.source}),
                    profile=d.profile(),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.context)],
            )
            for d in datasets
        ]
        if inputs:
            self._submit(lambda c: c.log_inputs(self._rid(), datasets=inputs), f"log {len(inputs)} dataset inputs")

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag  # heavy: mlflow loads only once a run is tracked

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, _MAX_TAGS):
            self._submit(lambda c, chunk=chunk: c.log_batch(self._rid(), tags=chunk), f"set {len(chunk)} tags")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric  # heavy: mlflow loads only once a run is tracked

        if self.sender is None or self._finished:
            return
        ts = int(time.time() * 1000)
        points = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._latest.update((m.key, m) for m in points)
        self.sender.add_metrics(self.run_id, points)

    def resend_history(self, rows: list[dict[str, float]]) -> None:
        """Send the points of ``rows`` (a resumed checkpoint's metric history: each row a ``step`` and its
        metrics) that the run does not have, by (key, step): those logged after the last flush before a crash.
        Queued like every call, ahead of the metrics logged after it; the run's history is read when it runs,
        so a retry after an outage sends nothing twice."""
        points: dict[tuple[str, int], float] = {}
        for row in rows:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    points.setdefault((key, step), float(value))  # MLflow keeps a step's first value too
        if points:
            self._submit(lambda c: self._resend(c, points), f"re-send {len(points)} history points")

    def _resend(self, client: Any, points: dict[tuple[str, int], float]) -> None:
        from mlflow.entities import Metric  # heavy: mlflow loads only once a run is tracked

        run_id = self._rid()
        have = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in {k for k, _ in points}}
        ts = int(time.time() * 1000)
        missing = [Metric(key, v, ts, step) for (key, step), v in points.items() if step not in have[key]]
        for chunk in _chunks(missing, MAX_BATCH):
            client.log_batch(run_id, metrics=chunk)
        if not missing:
            return
        assert self.sender is not None
        marks: dict[str, int] = {}
        for m in missing:
            marks[m.key] = max(m.step, marks.get(m.key, m.step))
        self.sender.set_high_water(run_id, marks)  # the same points logged again by the trainer stay single
        steps = sorted({m.step for m in missing})
        log.info(
            "MLflow: re-sent %d metric points of steps %d-%d from the checkpoint's history (run %s lacked them)",
            len(missing),
            steps[0],
            steps[-1],
            run_id,
        )

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._submit(lambda c: c.log_artifact(self._rid(), path, artifact_path), f"upload {Path(path).name}")

    def log_model(self, model: Any, *, card: ModelCard | None = None, tags: dict[str, str] | None = None) -> None:
        """Log ``model`` as a logged model described by ``card`` (its name, default the run name; the run's step it
        is the result of; an input example, from which the signature is inferred; metadata; extra files), with
        ``tags`` (e.g. the checkpoint it came from) on it and, with tracking.register_model, on a model version of
        the same name. The run's ``train_*`` and ``val_*`` points at that step are linked to it with the training
        and validation datasets, so its page and ``search_logged_models`` show the final results."""
        if not self.cfg.log_model:
            return
        try:
            snapshot = _clean_cpu_copy(model)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: the model cannot be copied for logging (%s); not logged", e)
            return
        card = card or ModelCard()
        name = card.name or self.run_name or "model"
        linked = [m for m in self._latest.values() if m.step == card.step and m.key.startswith(tuple(_LINKED))]
        self._submit(lambda c: self._log_model(c, snapshot, name, card, linked, dict(tags or {})), f"log model {name}")

    def _linked_metrics(self, model_id: str, points: list[Metric]) -> list[Metric]:
        from mlflow.entities import Metric  # heavy: mlflow loads only once a run is tracked

        out = []
        for m in points:
            data = self._datasets.get(_LINKED[m.key.split("_", 1)[0] + "_"])
            # The point's own timestamp and value: the run's history keeps it once (MLflow skips an identical row).
            out.append(
                Metric(
                    m.key,
                    m.value,
                    m.timestamp,
                    m.step,
                    model_id=model_id,
                    dataset_name=data.name if data else None,
                    dataset_digest=data.digest if data else None,
                    run_id=self._rid(),
                )
            )
        return out

    def _log_model(
        self, client: Any, model: Any, name: str, card: ModelCard, linked: list[Metric], tags: dict[str, str]
    ) -> None:
        import mlflow  # heavy: mlflow loads only once a run is tracked
        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import infer_signature

        # The fluent API that log_model uses reads the global URI; this process has only this tracker talking to
        # MLflow, so pointing it at our store is safe.
        run_id = self._rid()
        mlflow.set_tracking_uri(self.uri)
        run = client.get_run(run_id)
        # Created here rather than by log_model: given the run, log_model would link the run's metrics at the step
        # itself, without their datasets, and the model page would list each val_* twice.
        logged = client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=dict(run.data.params),
            tags={**{k: v for k, v in run.data.tags.items() if k in _CONTEXT_TAGS}, **tags},
            model_type="image-classifier",
        )
        signature = None
        example = card.input_example
        if example is not None:
            with torch.no_grad():
                out = model(torch.from_numpy(example)).numpy()
            signature = infer_signature(example, out)
        torch_version = torch.__version__.split("+")[0]
        # Explicit requirements and code: MLflow would otherwise import the model in a subprocess
        # to infer them, and the pickle needs the `pipeline` package to load anywhere.
        # Pickle is chosen deliberately (with the code alongside); MLflow's warning about it is noise.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            model_id=logged.model_id,
            signature=signature,
            input_example=example,
            metadata=card.metadata or None,
            extra_files=list(card.extra_files) or None,
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch_version}"],
            code_paths=[str(Path(__file__).resolve().parents[1])],
        )
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=card.step)])
        for chunk in _chunks(self._linked_metrics(logged.model_id, linked), MAX_BATCH):
            client.log_batch(run_id, metrics=chunk)
        if self.cfg.register_model:
            version = mlflow.register_model(info.model_uri, name, tags=tags or None)
            log.info("MLflow: registered model %s version %s (%s)", name, version.version, info.model_uri)


class FollowerTracker(NullTracker):
    """Every rank but global 0: receives the run id; on a node's local rank 0 it adds the node's system metrics."""

    def __init__(self, cfg: TrackingConfig, *, node_id: int = 0, is_local_main: bool = False) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.is_local_main = is_local_main
        self.run_id: str | None = None
        self._sender: BatchSender | None = None
        self._monitor: NodeSystemMetrics | None = None

    def start(self, run_id: str | None = None) -> str | None:
        self.run_id, start = share_run(None, None)
        if self.is_local_main and self.cfg.system_metrics and self.run_id:
            uri = resolve_uri(self.cfg)
            self._sender = _new_sender(self.cfg, uri, f"mlflow-sender-node{self.node_id}")
            if self._sender is not None:
                self._monitor = start_node_metrics(
                    run_id=self.run_id,
                    node_id=self.node_id,
                    interval_s=self.cfg.system_metrics_interval_s,
                    uri=uri,
                    sink=self._sender,
                    start_time_s=start if start is not None else time.time(),
                )
                # train.run() finishes the tracker on rank 0 only: deliver this node's samples at exit.
                atexit.register(self.finish)
        return self.run_id

    def finish(self, status: str = "FINISHED") -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close(min(10.0, self.cfg.finish_timeout_s))
