"""Start-up checks: what a run needs from the machine and the services around it, checked before any model,
engine or DALI pipeline is built, so a wrong URI or a missing bucket costs seconds, not the minutes of a start-up.

Every rank checks what is its own (its node's GPUs); rank 0 checks what is shared (the checkpoint store, the
tracking server, a local dataset root), so a store is asked once, not once per rank (the Checkpointer, once
built, checks every rank's access and staging folder). The problems are gathered over a CPU (gloo) group and
every rank raises the same :class:`PreflightError`, which ``pipeline.train`` turns into exit 2: no rank is left
waiting in a collective for one that failed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import torch

from pipeline.checkpoint.layout import storage_options
from pipeline.config import TrainConfig, describe_path
from pipeline.core.distributed import DistEnv, all_gather_objects, control_group
from pipeline.core.errors import UserError
from pipeline.core.storage import Storage, StorageError, is_remote
from pipeline.data import DataError, prepare_dataset_root
from pipeline.data.archive import is_archive
from pipeline.tracking.store import configure_http_for_training, resolve_uri

log = logging.getLogger("pipeline")


class PreflightError(UserError, RuntimeError):
    """One or more start-up checks failed; one line per problem, each naming the thing and the fix."""

    same_on_every_rank = True  # the checks' verdict is agreed across ranks before it is raised


def gpu_problem(*, device_type: str, local_world_size: int, device_count: int) -> str:
    """Why ``local_world_size`` processes cannot each have a GPU of their own ("" when they can): with fewer
    GPUs than processes, two ranks would share one (NCCL then fails, or the run is silently slower)."""
    if device_type != "cuda" or local_world_size <= device_count:
        return ""
    return (
        f"{local_world_size} processes on this node (LOCAL_WORLD_SIZE) but {device_count} visible GPU(s) "
        f"(torch.cuda.device_count()): start at most {device_count} per node (torchrun --nproc_per_node, "
        f"GPUS_PER_NODE) or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
    )


def storage_problem(cfg: TrainConfig) -> str:
    """Why the run's checkpoint folder cannot be listed and written ("" when it can): Storage.check_access."""
    uri = cfg.checkpoint.uri
    local = uri.removeprefix("file://")
    if not is_remote(uri) and os.path.exists(local) and not os.path.isdir(local):
        return (
            f"checkpoint.uri = {uri!r} {describe_path(local)}, expected a folder; give a folder or s3://bucket/prefix"
        )
    try:
        Storage(uri, **storage_options(cfg.checkpoint)).child(cfg.resolved_run_id).check_access()
    except StorageError as e:
        return f"checkpoint.uri = {uri!r}: {e}"
    return ""


def data_problem(cfg: TrainConfig) -> str:
    """Why a local dataset folder cannot be read ("" when it can, or when the data layer checks it as it
    prepares it: an archive to extract, an object-store prefix, the generated digits). The layout inside is the
    data layer's to check, when it lists the splits."""
    data = cfg.data
    if data.source != "folder" or is_remote(data.root) or is_archive(data.root):
        return ""
    try:
        prepare_dataset_root(data)  # for a local folder: only checks that it is one
    except DataError as e:
        return str(e)
    if not os.access(data.root.removeprefix("file://"), os.R_OK | os.X_OK):
        return f"data.root = {data.root!r} cannot be read by this user; check the folder's owner and mode"
    return ""


def _probe_mlflow(uri: str, timeout_s: float) -> str:
    """Why the MLflow store at ``uri`` cannot be used ("" when it answers): one small request, in a thread so
    that a server that accepts and never answers costs at most ``timeout_s``."""
    if not uri.startswith(("http://", "https://")):
        if not uri.startswith("sqlite:///"):
            return ""  # a file store or a plugin scheme: the tracker opens it itself
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            return f"names a database in {folder}, which {describe_path(folder)}"
        if not os.access(folder, os.W_OK):
            return f"names a database in {folder}, which this user cannot write to"
        return ""
    configure_http_for_training()  # one attempt, no client-side retries with backoff
    from mlflow import MlflowClient  # heavy (seconds): only an http(s) tracking URI is asked here

    answer: list[str] = []

    def ask() -> None:
        try:
            MlflowClient(uri).search_experiments(max_results=1)
            answer.append("")
        except Exception as e:  # noqa: BLE001 - whatever it is, the server cannot be used: say what it said
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            answer.append(f"cannot be used as an MLflow server ({text})")

    t = threading.Thread(target=ask, name="preflight-mlflow", daemon=True)
    t.start()
    t.join(timeout_s)
    return answer[0] if answer else f"did not answer within {timeout_s:g} s (tracking.start_timeout_s)"


def tracking_problem(cfg: TrainConfig) -> str:
    """With ``tracking.required``, why the tracking URI cannot be used ("" when it can). Without it the same
    problem is a warning and the run starts untracked, as documented (its metrics buffered for a late server)."""
    if not cfg.tracking.enabled:
        return ""
    uri = resolve_uri(cfg.tracking)
    why = _probe_mlflow(uri, cfg.tracking.start_timeout_s)
    if not why:
        return ""
    if cfg.tracking.required:
        return (
            f"tracking.uri = {uri!r} {why}; start the MLflow server or fix --tracking.uri (or MLFLOW_TRACKING_URI), "
            f"or set tracking.required = false to train without it"
        )
    log.warning(
        "MLflow at %s %s: training starts anyway and its metrics are buffered until the server answers "
        "(set tracking.required = true to make this an error)",
        uri,
        why,
    )
    return ""


def check_run(cfg: TrainConfig, *, env: DistEnv, checkpointing: bool = True) -> None:
    """Run the start-up checks of ``cfg`` on this rank and agree on the verdict with every other rank (a
    collective). Raises PreflightError on every rank when any check failed anywhere."""
    gpus = gpu_problem(
        device_type=env.device.type,
        local_world_size=env.local_world_size,
        device_count=torch.cuda.device_count() if env.device.type == "cuda" else 0,
    )
    problems = [f"on {socket.gethostname()}: {gpus}" if gpus else ""]
    if env.is_main:
        if checkpointing:
            problems.append(storage_problem(cfg))
        problems += [data_problem(cfg), tracking_problem(cfg)]
    # Over a CPU group: the GPU check may just have found that an NCCL one cannot work. The ranks of one node
    # find the same local problems: each is said once.
    gathered = all_gather_objects([p for p in problems if p], group=control_group())
    found = list(dict.fromkeys(p for rank_problems in gathered for p in rank_problems))
    if found:
        raise PreflightError("\n".join(f"start-up check failed: {p}" for p in found))
