"""What a run's checkpoints look like on storage, and how to commit, read, choose, verify and tidy them.

Layout under ``<checkpoint.uri>/<run_id>/``::

    step-<N>/mp_rank_00_model_states.pt, zero_pp_rank_*...   DeepSpeed's files, as it wrote them
    step-<N>/trainer-rank<R>.pt                              each rank's trainer state (RNG, data position)
    step-<N>/parts/rank-<R>.json                             what rank R uploaded (size, sha256)
    step-<N>/manifest.json                                   written last: the checkpoint is committed
    step-<N>/manifest.<reason>.json                          a set-aside (uncommitted) manifest
    latest                                                   "step-<N>", moved only after the manifest

Storage only, no collectives: usable from tools, evaluation and tests as well as the Checkpointer.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import CheckpointConfig
from pipeline.core.errors import UserError
from pipeline.core.storage import FileInfo, Storage, StorageError

log = logging.getLogger("pipeline.checkpoint")

MANIFEST = "manifest.json"
LATEST = "latest"
PARTS_DIR = "parts"
FORMAT = 1
_TAG = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint problem; the message names the URI or file and what to do."""


def tag_for(step: int) -> str:
    return f"step-{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def storage_options(cfg: CheckpointConfig) -> dict[str, Any]:
    """The Storage keyword arguments (endpoint, region, profile, timeouts) that ``checkpoint.*`` configures."""
    return {
        "endpoint_url": cfg.endpoint_url,
        "region": cfg.region,
        "profile": cfg.profile,
        "connect_timeout_s": cfg.connect_timeout_s,
        "read_timeout_s": cfg.read_timeout_s,
    }


def read_latest(store: Storage) -> tuple[str | None, str]:
    """The step ``latest`` names, and why it cannot be used: (tag, "") when it holds a step name, (None, "")
    when there is no ``latest``, (None, reason) when it cannot be read or holds anything else (binary bytes,
    text garbage). Never raises for its content: a damaged ``latest`` must not make a run unresumable."""
    try:
        data = store.read_bytes(LATEST)
    except StorageError as e:
        return (None, "") if e.kind == "not_found" else (None, str(e))
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"it holds binary bytes ({data[:24]!r}), not a step name"
    if step_of(text) is None:
        return None, f"it holds {text[:40]!r}, not a step name"
    return text, ""


# --------------------------------------------------------------------------------------------------
# Manifests and the committed checkpoints


def read_manifest(store: Storage, tag: str) -> dict[str, Any] | None:
    """The manifest of ``tag``; None when it has none (uncommitted). Unreadable JSON raises CheckpointError."""
    try:
        text = store.read_text(f"{tag}/{MANIFEST}")
    except StorageError as e:
        if e.kind == "not_found":
            return None
        raise
    try:
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT or manifest.get("tag") != tag or not manifest.get("files"):
            raise ValueError("missing fields")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"manifest {store.url(f'{tag}/{MANIFEST}')} is unreadable ({e})") from e
    return manifest


def list_steps(store: Storage) -> list[str]:
    """Every step folder of a run, newest first (committed or not)."""
    tags = [n for n in store.list() if step_of(n) is not None]
    return sorted(tags, key=lambda t: step_of(t) or 0, reverse=True)


def committed_tags(store: Storage) -> list[str]:
    """Step folders that have a manifest, newest first."""
    return [t for t in list_steps(store) if store.exists(f"{t}/{MANIFEST}")]


def committed_candidates(store: Storage) -> list[tuple[str, dict[str, Any]]]:
    """The committed checkpoints of a run folder with their manifests, newest first: the ones to try,
    in order, when resuming or evaluating. Step folders without a manifest (uncommitted, set aside) or
    with an unreadable one are skipped with a warning; so is a ``latest`` that names an uncommitted or
    missing tag or holds no step name. Raises CheckpointError when ``latest`` exists but nothing is committed (the
    checkpoints were lost, which must never read as "no checkpoint yet")."""
    latest, latest_err = read_latest(store)
    candidates = []
    steps = list_steps(store)
    for tag in steps:
        try:
            manifest = read_manifest(store, tag)
        except CheckpointError as e:
            log.warning("%s; skipping %s", e, tag)
            continue
        if manifest is None:
            if tag == latest:
                log.warning("%s names %s, which has no manifest (not committed); falling back", store.url(LATEST), tag)
            continue
        candidates.append((tag, manifest))
    if latest and latest not in steps:
        log.warning(
            "%s names %s, which does not exist under %s; falling back to the newest committed checkpoint",
            store.url(LATEST),
            latest,
            store.uri,
        )
    if latest_err:
        log.warning(
            "%s exists but cannot be used (%s); choosing among committed checkpoints", store.url(LATEST), latest_err
        )
    if (latest or latest_err) and not candidates:
        raise CheckpointError(
            f"{store.url(LATEST)} exists but no committed checkpoint (step-*/{MANIFEST}) was found under {store.uri}"
        )
    if not latest and not latest_err and candidates:
        log.warning("%s is missing but committed checkpoints exist; using the newest", store.url(LATEST))
    return candidates


def first_good(
    store: Storage,
    candidates: list[tuple[str, dict[str, Any]]],
    check: Callable[[str, dict[str, Any]], None],
    *,
    announce: bool = True,
) -> tuple[tuple[str, dict[str, Any]] | None, list[tuple[str, str]]]:
    """Try ``candidates`` (``committed_candidates``' order, newest first) with ``check(tag, manifest)``,
    which fetches and verifies what the caller needs and raises CheckpointError when it cannot. Returns
    the first one that passes (None when none does) and the rejected ones as (tag, reason), each warned
    about with the one it falls back to (``announce=False``: not logged, e.g. on ranks other than 0)."""
    rejected: list[tuple[str, str]] = []
    for i, (tag, manifest) in enumerate(candidates):
        try:
            check(tag, manifest)
        except CheckpointError as e:
            rejected.append((tag, str(e)))
            if announce:
                nxt = candidates[i + 1][0] if i + 1 < len(candidates) else None
                log.warning(
                    "checkpoint %s rejected: %s; %s",
                    store.url(tag),
                    e,
                    f"falling back to {nxt}" if nxt else "no older committed checkpoint is left",
                )
            continue
        return (tag, manifest), rejected
    return None, rejected


def verified_file(store: Storage, rel: str, local: str | Path, entry: dict[str, Any]) -> Path:
    """Download ``rel`` to ``local`` and check it against its manifest ``entry`` (size and sha256).
    Returns the local path; raises CheckpointError naming the file when it cannot be read or differs."""
    try:
        got = store.get(rel, local)
    except StorageError as e:
        raise CheckpointError(f"file {store.url(rel)} cannot be read ({e})") from e
    if got.size != entry["size"]:
        raise CheckpointError(f"file {store.url(rel)} has {got.size} bytes, the manifest says {entry['size']}")
    if got.sha256 != entry["sha256"]:
        raise CheckpointError(
            f"file {store.url(rel)} fails its checksum (sha256 {got.sha256[:16]}..., the "
            f"manifest says {entry['sha256'][:16]}...)"
        )
    return Path(local)


# --------------------------------------------------------------------------------------------------
# What a checkpoint was written for: its manifest records the model and the config (resume and evaluate compare)


def describe_model(model: dict[str, str]) -> str:
    """``cifar_resnet20 (depth 20, residual true, shortcut A, 10 classes)`` for a recorded model."""
    return (
        f"{model.get('name', '?')} (depth {model.get('depth', '?')}, residual {model.get('residual', '?')}, "
        f"shortcut {model.get('shortcut', '?')}, {model.get('num_classes', '?')} classes)"
    )


def check_model(manifest: dict[str, Any], *, url: str, model: dict[str, str], fix: str) -> None:
    """Refuse the checkpoint at ``url`` when its manifest records another model than ``model`` (two networks of
    the same shapes, such as plain-20 and ResNet-20 with option A, would load without a word): a CheckpointError
    naming both and ``fix``. A manifest written before models were recorded is not compared, with a warning."""
    recorded = manifest.get("model")
    if not isinstance(recorded, dict):
        log.warning("%s records no model (written by an older version): it is not checked against %s", url, model)
        return
    differ = [k for k in sorted(set(recorded) | set(model)) if str(recorded.get(k)) != str(model.get(k))]
    if differ:
        raise CheckpointError(
            f"checkpoint {url} holds {describe_model(recorded)} but the config asks for {describe_model(model)} "
            f"({', '.join(f'{k}: {recorded.get(k)} vs {model.get(k)}' for k in differ)}); {fix}"
        )


def config_changes(manifest: dict[str, Any], *, config: dict[str, str] | None, config_hash: str) -> str:
    """ "" when the manifest's config hash is ``config_hash``; else the hashes and, when the manifest records the
    flattened experiment keys (and ``config`` is given), the keys that differ with both values: for a warning."""
    if manifest.get("config_hash") == config_hash:
        return ""
    out = f"hash {manifest.get('config_hash')}, now {config_hash}"
    old = manifest.get("config")
    if isinstance(old, dict) and config is not None:
        changed = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        out += "; changed: " + ", ".join(f"{k} {old.get(k, '(unset)')} -> {config.get(k, '(unset)')}" for k in changed)
    return out


# --------------------------------------------------------------------------------------------------
# Parts: what each rank uploaded, and rank 0's commit once all are stored


def write_part(store: Storage, tag: str, *, rank: int, session: str, step: int, files: list[FileInfo]) -> None:
    """Record the files ``rank`` uploaded for ``tag`` (paths given relative to the run, ``<tag>/...``)."""
    part = {
        "rank": rank,
        "session": session,
        "step": step,
        "files": [{**asdict(i), "path": i.path.split("/", 1)[1], "rank": rank} for i in files],
    }
    store.write_text(f"{tag}/{PARTS_DIR}/rank-{rank:05d}.json", json.dumps(part))


def read_parts(store: Storage, tag: str) -> dict[int, dict[str, Any]]:
    """The part lists stored so far for ``tag``, by rank (unreadable ones are skipped: not yet whole)."""
    out: dict[int, dict[str, Any]] = {}
    for name in store.list(f"{tag}/{PARTS_DIR}"):
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            part = json.loads(store.read_text(f"{tag}/{PARTS_DIR}/{name}"))
        except ValueError:
            continue
        except StorageError as e:
            if e.kind == "not_found":
                continue
            raise
        out[int(part["rank"])] = part
    return out


class PartsMissing(Exception):
    """Raised by ``commit`` while some ranks' parts are not stored yet (the message lists them)."""


def commit(
    store: Storage, tag: str, *, meta: dict[str, Any], session: str, world_size: int, keep_last: int, keep_every: int
) -> None:
    """Once all ``world_size`` ranks' parts of ``session`` are stored, write the manifest (``meta`` and the
    files), then ``latest``, then apply retention; raises PartsMissing before that."""
    parts = {r: p for r, p in read_parts(store, tag).items() if p.get("session") == session}
    missing = [r for r in range(world_size) if r not in parts]
    if missing:
        raise PartsMissing(", ".join(map(str, missing)))
    files = [f for r in sorted(parts) for f in parts[r]["files"]]
    manifest = {
        **meta,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": sorted(files, key=lambda f: f["path"]),
    }
    store.write_text(f"{tag}/{MANIFEST}", json.dumps(manifest, indent=1))
    store.write_text(LATEST, tag)
    log.info(
        "checkpoint %s committed (%d files, %.1f MiB) at %s",
        tag,
        len(files),
        sum(f["size"] for f in files) / 2**20,
        store.url(tag),
    )
    try:
        deleted = apply_retention(store, keep_last=keep_last, keep_every=keep_every, newest=tag)
        if deleted:
            log.info("retention: deleted %s", ", ".join(deleted))
    except StorageError as e:
        log.warning("retention after %s failed (%s); older checkpoints stay until the next commit", tag, e)


# --------------------------------------------------------------------------------------------------
# Tidying


def set_aside(store: Storage, tag: str, reason: str) -> None:
    """Uncommit ``tag`` without losing it: the manifest becomes ``manifest.<reason>.json``."""
    try:
        data = store.read_bytes(f"{tag}/{MANIFEST}")
    except StorageError as e:
        if e.kind == "not_found":
            return
        raise
    store.write_bytes(f"{tag}/manifest.{reason}.json", data)
    store.delete(f"{tag}/{MANIFEST}")


def apply_retention(store: Storage, *, keep_last: int, keep_every: int, newest: str) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (sparing every ``keep_every``-th
    step) and uncommitted leftovers, but only folders older than ``newest``, which was just committed.
    Returns the deleted tags."""
    newest_step = step_of(newest) or 0
    tags = list_steps(store)
    committed = [t for t in tags if store.exists(f"{t}/{MANIFEST}")]
    keep = set(committed[:keep_last]) | {newest}
    if keep_every:
        keep |= {t for t in committed if (step_of(t) or 0) % keep_every == 0}
    deleted = []
    for t in tags:
        if (step_of(t) or 0) >= newest_step or t in keep:
            continue  # newer folders may be uploads in flight
        # Manifest first: a crash halfway leaves an uncommitted folder, never a committed torn one.
        store.delete(f"{t}/{MANIFEST}")
        store.delete(t, recursive=True)
        deleted.append(t)
    return deleted
