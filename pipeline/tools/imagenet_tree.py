"""ILSVRC-2012 archives -> an ImageFolder tree, locally or on S3 (``python -m pipeline.tools.prepare imagenet``).

The layout of the tree (classes, per-class records under ``.manifest/``, ``manifest.json`` written last) and how an
interrupted run resumes are in the help text of :mod:`pipeline.tools.prepare`. Each archive is read
once, as a stream; images are written by a bounded pool of threads (:class:`_Writer`); :class:`_PreparedTree` knows
where a class is staged and when it counts as done.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pipeline.core.storage import Storage, StorageError
from pipeline.data.errors import DataError
from pipeline.data.folder import is_url
from pipeline.tools.ilsvrc import iter_train_classes, iter_val_images, open_input, read_devkit, read_loc_csv
from pipeline.tools.mean_image import write_mean_image
from pipeline.tools.progress import progress_bar

DATASET_FORMAT = 1  # of the dataset manifest and its per-class records (not pipeline.checkpoint's manifests)
DATASET_MANIFEST = "manifest.json"
PARTS = ".manifest"
STAGING = ".partial"
SPLITS = ("train", "val")


def _digest(files: dict[str, list]) -> str:
    """sha256 of a class's file list ({name: [size, sha256]}), recorded in manifest.json."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _PreparedTree:
    """The tree being prepared: where a class's files go while it is written, what is stored, and the per-class
    records (``.manifest/<split>/<class>.json``) that mark a class as done."""

    def __init__(self, out: str, *, write: bool = False) -> None:
        self.url = out.rstrip("/")
        self.remote = is_url(out)
        self.store = Storage(self.url)
        try:
            if write:
                self.store.check_access(write=True)
            elif not self.store.exists():
                raise DataError(f"{out} does not exist")
        except StorageError as e:
            raise DataError(f"{out}: {e}") from e

    # -- per-class records ----------------------------------------------------------------------
    def part(self, split: str, cls: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_text(f"{PARTS}/{split}/{cls}.json"))
        except StorageError as e:
            if e.kind == "not_found":
                return None
            raise
        except ValueError:
            return None  # unreadable: the class is redone

    def write_part(self, split: str, cls: str, files: dict[str, list]) -> None:
        part = {"format": DATASET_FORMAT, "split": split, "class": cls, "files": files}
        self.store.write_text(f"{PARTS}/{split}/{cls}.json", json.dumps(part, sort_keys=True))

    def parts(self, split: str) -> list[str]:
        return sorted(n[:-5] for n in self.store.list(f"{PARTS}/{split}") if n.endswith(".json"))

    def stored(self, split: str, cls: str) -> dict[str, int]:
        """{name: size} of the class folder as stored now."""
        return self._files(f"{split}/{cls}")

    def _files(self, folder: str) -> dict[str, int]:
        # Hidden names are the temporaries of an interrupted atomic write, never images.
        return {k: v for k, v in self.store.find(folder).items() if "/" not in k and not k.startswith(".")}

    def complete(self, split: str, cls: str) -> bool:
        part = self.part(split, cls)
        if part is None:
            return False
        return self.stored(split, cls) == {n: s for n, (s, _) in part["files"].items()}

    # -- writing ---------------------------------------------------------------------------------
    def _writing(self, split: str, cls: str) -> str:
        # Locally a class is written under .partial/ and renamed into place whole; an object store has no
        # rename, so objects go to their final place and the class record written last marks it done.
        return f"{split}/{cls}" if self.remote else f"{STAGING}/{split}/{cls}"

    def staged(self, split: str, cls: str) -> dict[str, int]:
        """What an earlier attempt already wrote for this class (for the per-file resume of val)."""
        return self._files(self._writing(split, cls))

    def begin(self, split: str, cls: str, *, fresh: bool) -> None:
        if fresh and not self.remote:
            self.store.delete(self._writing(split, cls), recursive=True)

    def write(self, split: str, cls: str, name: str, data: bytes) -> None:
        # Atomic: a file under its final name is never torn (resume trusts it); on S3 one PUT. No fsync per
        # image (1.3M of them would cost minutes to hours on a parallel filesystem): commit() checks every
        # file's size against the class record once the class is complete.
        self.store.write_bytes(f"{self._writing(split, cls)}/{name}", data, durable=False)

    def commit(self, split: str, cls: str, files: dict[str, list]) -> None:
        """Make the class visible, check it against ``files`` and record it."""
        if self.remote:
            for extra in sorted(set(self.stored(split, cls)) - set(files)):
                self.store.delete(f"{split}/{cls}/{extra}")  # left by another archive: it would be trained on
        else:
            # A complete but unrecorded class (interrupted right after the rename) is replaced.
            self.store.delete(f"{split}/{cls}", recursive=True)
            self.store.rename(self._writing(split, cls), f"{split}/{cls}")
        stored = self.stored(split, cls)
        expected = {n: s for n, (s, _) in files.items()}
        if stored != expected:
            bad = sorted(n for n in set(stored) | set(expected) if stored.get(n) != expected.get(n))
            raise DataError(
                f"{self.store.url(f'{split}/{cls}')}: after writing, {len(bad)} file(s) are missing or "
                f"have the wrong size (e.g. {bad[0]}: stored {stored.get(bad[0])} bytes, expected "
                f"{expected.get(bad[0])}); check the free space and the storage, then run again"
            )
        self.write_part(split, cls, files)


class _Writer:
    """A bounded pool of write threads: the stream never runs more than ``4 * workers`` images ahead."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prepare-write")
        self.slots = threading.Semaphore(4 * max(1, workers))
        self.futures: list[Future] = []
        self.failed: Future | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.failed is not None:
            self.failed.result()  # stop reading the archive as soon as a write has failed
        self.slots.acquire()
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        self.futures.append(fut)

    def _done(self, fut: Future) -> None:
        if fut.exception() is not None and self.failed is None:
            self.failed = fut
        self.slots.release()

    def drain(self) -> None:
        futures, self.futures = self.futures, []
        for fut in futures:
            fut.result()  # the first failed write raises here, naming its URI (StorageError) or path

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _size_of(path: str) -> int:
    with open_input(path) as (_, size):
        return size


# --------------------------------------------------------------------------------------------------
# The splits


def _prepare_train(tree: _PreparedTree, train_tar: str, writer: _Writer, *, progress: bool) -> tuple[int, int]:
    """Returns (classes written, classes skipped as already complete)."""
    bar = progress_bar(_size_of(train_tar), enabled=progress, desc="train", unit="B")
    written = skipped = 0
    try:
        for cls, archived, images in iter_train_classes(train_tar):
            if tree.complete("train", cls):
                skipped += 1
                bar.update(archived)
                continue
            tree.begin("train", cls, fresh=True)
            files: dict[str, list] = {}
            for name, data in images:
                files[name] = [len(data), hashlib.sha256(data).hexdigest()]
                writer.submit(tree.write, "train", cls, name, data)
                bar.update(len(data))
            writer.drain()
            if not files:
                raise DataError(f"{train_tar}: the class archive {cls}.tar holds no images")
            tree.commit("train", cls, files)
            written += 1
    finally:
        bar.close()
    return written, skipped


def _prepare_val(
    tree: _PreparedTree, val_tar: str, labels: dict[str, str], writer: _Writer, *, progress: bool
) -> tuple[int, int]:
    classes = sorted(set(labels.values()))
    done = {c for c in classes if tree.complete("val", c)}
    if len(done) == len(classes):
        return 0, len(classes)
    todo = [c for c in classes if c not in done]
    present = {c: tree.staged("val", c) for c in todo}
    for c in todo:
        tree.begin("val", c, fresh=False)  # val images of all classes arrive interleaved: keep what is there
    files: dict[str, dict[str, list]] = {c: {} for c in todo}
    seen = 0
    bar = progress_bar(_size_of(val_tar), enabled=progress, desc="val", unit="B")
    try:
        for name, data in iter_val_images(val_tar):
            cls = labels.get(name)
            if cls is None:
                raise DataError(
                    f"{val_tar} holds {name}, which the validation labels do not list: the labels "
                    f"(--devkit / --val-labels) belong to another set of images"
                )
            seen += 1
            bar.update(len(data))
            if cls in done:
                continue
            files[cls][name] = [len(data), hashlib.sha256(data).hexdigest()]
            if present[cls].get(name) != len(data):
                writer.submit(tree.write, "val", cls, name, data)
        writer.drain()
    finally:
        bar.close()
    expected = len(labels)
    if seen != expected:
        missing = sorted(set(labels) - _names_seen(files, done, labels))[:3]
        raise DataError(
            f"{val_tar} holds {seen} images but the validation labels list {expected} (missing e.g. "
            f"{', '.join(missing)}): is the archive complete?"
        )
    for c in todo:
        tree.commit("val", c, files[c])
    return len(todo), len(done)


def _names_seen(files: dict[str, dict[str, list]], done: set[str], labels: dict[str, str]) -> set[str]:
    seen = {n for per in files.values() for n in per}
    return seen | {n for n, c in labels.items() if c in done}


def _val_labels(devkit: str, val_labels: str) -> dict[str, str]:
    if devkit and val_labels:
        raise DataError(
            "give the validation labels once: --devkit ILSVRC2012_devkit_t12.tar.gz or --val-labels "
            "LOC_val_solution.csv, not both"
        )
    if devkit:
        return read_devkit(devkit)
    if val_labels:
        return read_loc_csv(val_labels)
    raise DataError(
        "--val-tar needs the validation labels: --devkit ILSVRC2012_devkit_t12.tar.gz (ground truth + "
        "meta.mat) or --val-labels LOC_val_solution.csv"
    )


# --------------------------------------------------------------------------------------------------
# Manifest


def build_dataset_manifest(tree_url: str, *, mean_image: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise every class record of the tree; raise if the splits' classes disagree."""
    tree = _PreparedTree(tree_url)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        classes = {}
        for cls in tree.parts(split):
            part = tree.part(split, cls)
            if part is None:
                continue
            classes[cls] = {
                "files": len(part["files"]),
                "bytes": sum(s for s, _ in part["files"].values()),
                "sha256": _digest(part["files"]),
            }
        if classes:
            splits[split] = {
                "classes": classes,
                "files": sum(c["files"] for c in classes.values()),
                "bytes": sum(c["bytes"] for c in classes.values()),
            }
    if "train" in splits and "val" in splits and set(splits["train"]["classes"]) != set(splits["val"]["classes"]):
        only_train = sorted(set(splits["train"]["classes"]) - set(splits["val"]["classes"]))
        only_val = sorted(set(splits["val"]["classes"]) - set(splits["train"]["classes"]))
        raise DataError(
            f"{tree_url}: the training and validation classes differ (only in train: "
            f"{', '.join(only_train[:5]) or 'none'}; only in val: {', '.join(only_val[:5]) or 'none'}): "
            f"the archives and the labels are not from the same release"
        )
    manifest: dict[str, Any] = {
        "format": DATASET_FORMAT,
        "dataset": "ILSVRC2012",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "splits": splits,
    }
    if mean_image:
        manifest["mean_image"] = mean_image
    return manifest


def read_dataset_manifest(tree_url: str) -> dict[str, Any]:
    try:
        return json.loads(Storage(tree_url).read_text(DATASET_MANIFEST))
    except StorageError as e:
        if e.kind == "not_found":
            raise DataError(
                f"{tree_url} has no {DATASET_MANIFEST}: it was not written by pipeline.tools.prepare, or "
                f"the preparation did not finish (run the same prepare command again to resume)"
            ) from e
        raise DataError(f"cannot read {tree_url}/{DATASET_MANIFEST}: {e}") from e
    except ValueError as e:
        raise DataError(
            f"{tree_url}/{DATASET_MANIFEST} is not valid JSON ({e}); run prepare again to rewrite it"
        ) from e


def verify_tree(tree_url: str, *, workers: int = 8, progress: bool = True) -> list[str]:
    """Re-check a prepared tree against its manifest: every class record, every file's presence, size
    and sha256. Returns the problems found, each naming the file; [] when the tree is intact."""
    tree = _PreparedTree(tree_url)
    manifest = read_dataset_manifest(tree_url)
    problems: list[str] = []
    to_hash: list[tuple[str, str, int, str]] = []  # (split, rel, size, sha256)
    for split, info in manifest.get("splits", {}).items():
        for cls, summary in info["classes"].items():
            part = tree.part(split, cls)
            where = tree.store.url(f"{split}/{cls}")
            if part is None:
                problems.append(f"{where}: its record {PARTS}/{split}/{cls}.json is missing or unreadable")
                continue
            if _digest(part["files"]) != summary["sha256"]:
                problems.append(f"{where}: its record {PARTS}/{split}/{cls}.json does not match {DATASET_MANIFEST}")
            stored = tree.stored(split, cls)
            for name, (size, sha) in sorted(part["files"].items()):
                rel = f"{split}/{cls}/{name}"
                if name not in stored:
                    problems.append(f"{tree.store.url(rel)}: missing")
                elif stored[name] != size:
                    problems.append(f"{tree.store.url(rel)}: {stored[name]} bytes, the manifest says {size}")
                else:
                    to_hash.append((split, rel, size, sha))
            for extra in sorted(set(stored) - set(part["files"])):
                problems.append(
                    f"{tree.store.url(f'{split}/{cls}/{extra}')}: not in the manifest (it would be trained on)"
                )
    bar = progress_bar(sum(s for _, _, s, _ in to_hash), enabled=progress, desc="verify", unit="B")

    def check(item: tuple[str, str, int, str]) -> str | None:
        _, rel, size, sha = item
        h = hashlib.sha256()
        with tree.store.open(rel) as f:
            while block := f.read(1 << 20):
                h.update(block)
        bar.update(size)
        return None if h.hexdigest() == sha else f"{tree.store.url(rel)}: sha256 differs from the manifest"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems += [p for p in pool.map(check, to_hash) if p]
    bar.close()
    return problems


def prepare_imagenet(
    out: str,
    *,
    train_tar: str = "",
    val_tar: str = "",
    devkit: str = "",
    val_labels: str = "",
    workers: int = 8,
    mean_samples: int = 10000,
    image_size: int = 224,
    resize: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish writing) the ImageFolder tree at ``out`` from the archives; returns the manifest."""
    if not (train_tar or val_tar):
        raise DataError("nothing to prepare: give --train-tar and/or --val-tar (or --verify to check an existing tree)")
    labels = _val_labels(devkit, val_labels) if val_tar else None  # bad labels fail before any writing
    tree = _PreparedTree(out, write=True)
    writer = _Writer(workers)
    report = []
    train_written = 0
    try:
        if train_tar:
            train_written, skipped = _prepare_train(tree, train_tar, writer, progress=progress)
            report.append(f"train: {train_written} classes written, {skipped} already complete")
        if val_tar:
            assert labels is not None
            written, skipped = _prepare_val(tree, val_tar, labels, writer, progress=progress)
            report.append(f"val: {written} classes written, {skipped} already complete")
    finally:
        writer.close()
    tree.store.delete(STAGING, recursive=True)
    previous = _previous_mean(tree.url)
    mean_info = previous
    stale = previous is None or (previous.get("size"), previous.get("resize")) != (image_size, resize)
    if mean_samples > 0 and train_tar and (stale or train_written):
        mean_info = write_mean_image(
            tree.url, size=image_size, resize=resize, samples=mean_samples, workers=workers, progress=progress
        )
    manifest = build_dataset_manifest(tree.url, mean_image=mean_info)
    tree.store.write_text(DATASET_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    for line in report:
        print(line, file=sys.stderr)
    return manifest


def _previous_mean(tree_url: str) -> dict[str, Any] | None:
    try:
        return read_dataset_manifest(tree_url).get("mean_image")
    except DataError:
        return None
