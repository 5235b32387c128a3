"""ImageFolder datasets: ``<root>/<split>/<class>/<image>``, scanned and validated up front.

The file and label lists built here are handed to ``fn.readers.file`` explicitly instead of letting
DALI walk ``file_root`` itself: that way the class index is ours (sorted folder names, as
torchvision's ImageFolder), and every layout mistake becomes a :class:`DataError` naming the path
before a pipeline or a process group exists, instead of a C++ exception on one rank mid-job.

A root may be a local folder or an object-store URL (``s3://bucket/imagenet``). Both are listed
through :mod:`pipeline.core.storage` (a local walk, or one paginated listing per split); remote files are
handed to DALI as URLs, which its own S3 client reads.

An exclude list (``data.exclude_list``, written by ``python -m pipeline.tools.validate``) removes
images DALI cannot decode, or points them at converted copies, before the index is built.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.config import describe_path
from pipeline.core.storage import Storage, StorageError

# is_url: an object-store URL (s3://...); file:// and plain paths are local
from pipeline.core.storage import is_remote as is_url
from pipeline.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared case-insensitively (.JPEG is ImageNet's)


@dataclass(frozen=True)
class SplitIndex:
    """Every image of one split, in a fixed order, with its class index."""

    path: str  # the split folder
    classes: tuple[str, ...]  # class folder names; a label is a position in this tuple
    files: tuple[str, ...]  # absolute paths (or URLs), grouped by class, sorted within a class
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class FileFixes:
    """What an exclude list says about individual images, keyed by path relative to the dataset root."""

    source: str  # the list's own path, for messages
    skip: frozenset[str] = frozenset()
    replace: dict[str, str] = field(default_factory=dict)  # relative path -> path or URL of a converted copy

    def __bool__(self) -> bool:
        return bool(self.skip or self.replace)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if is_url(base) else os.path.join(base, *parts)


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """Storage errors (no bucket, no credentials, endpoint down) become a DataError naming the dataset."""
    try:
        yield
    except StorageError as e:
        raise DataError(f"cannot read the dataset at {url}: {e}") from e


# --------------------------------------------------------------------------------------------------
# Listing: the same questions answered for a local folder and for an object-store prefix, through Storage.


def list_classes(split_path: str) -> list[str]:
    """Sorted class folder names of a split; hidden folders (``.ipynb_checkpoints``) are not classes."""
    with _reading(split_path):
        return [n for n in Storage(split_path).list_dirs() if not n.startswith(".")]


def _split_exists(split_path: str) -> bool:
    with _reading(split_path):
        return Storage(split_path).is_dir()


def _top_level_names(split_path: str) -> list[str]:
    with _reading(split_path):
        return [n for n in Storage(split_path).list() if not n.startswith(".")]


def _split_images(split_path: str, classes: Iterable[str]) -> dict[str, list[str]]:
    """Every image path (or URL) under each class of a split, from one walk (one listing on S3), in
    torchvision's ImageFolder order: folders in path order, files sorted within a folder. Symlinked
    folders (a common way to assemble ImageNet splits) are followed; hidden folders are skipped."""
    wanted = set(classes)
    with _reading(split_path):
        walked = Storage(split_path).walk(skip_hidden=True)
    per_class: dict[str, list[str]] = {c: [] for c in wanted}
    for folder, _, names in walked:
        parts = folder.split("/") if folder else []
        if not parts or parts[0] not in wanted:
            continue
        # Joined onto split_path as given (not Storage's absolute root): _apply_fixes slices them by its length.
        per_class[parts[0]].extend(_join(split_path, *parts, n) for n in names if is_image(n))
    return per_class


def _check_split_layout(split_path: str, classes: list[str]) -> None:
    if classes:
        return
    names = _top_level_names(split_path)
    if not names:
        raise DataError(
            f"{split_path} is empty: expected an ImageFolder layout {split_path}/<class>/<image> "
            f"with one folder per class"
        )
    loose = [n for n in names if is_image(n)]
    what = f"{len(loose)} images directly in it (e.g. {loose[0]!r})" if loose else f"only files ({names[0]!r}, ...)"
    raise DataError(
        f"{split_path} is not an ImageFolder layout: expected {split_path}/<class>/<image>, but it has "
        f"no class folders and {what}; move the images into one sub-folder per class"
    )


# --------------------------------------------------------------------------------------------------
# Exclude lists


def read_exclude_list(path: str, *, root: str) -> FileFixes:
    """Parse an exclude list: ``rel/path`` to skip an image, ``rel/path<TAB>replacement`` to read a
    converted copy instead; ``#`` starts a comment line. ``path`` may be relative to ``root``."""
    candidates = [path] if os.path.isabs(path) or is_url(path) else [path, _join(root, path)]
    text = None
    for cand in candidates:
        folder, name = Storage.of_file(cand)
        try:
            text = folder.read_text(name)
        except StorageError:
            continue
        path = cand
        break
    if text is None:
        raise DataError(
            f"data.exclude_list = {path!r} does not exist (looked at {', '.join(candidates)}); write it "
            f"with `python -m pipeline.tools.validate {root} --write-list LIST` or set "
            f"data.exclude_list = ''"
        )
    skip: set[str] = set()
    replace: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rel, _, new = line.partition("\t")
        rel = rel.strip()
        if not rel or rel.startswith(("..", "/")) or is_url(rel) or os.path.isabs(rel):
            raise DataError(
                f"{path}, line {lineno}: {line!r} is not a path relative to the dataset root "
                f"(e.g. 'train/n01440764/x.JPEG'); fix the line or re-run pipeline.tools.validate"
            )
        if new.strip():
            replace[rel] = new.strip()
        else:
            skip.add(rel)
    return FileFixes(source=path, skip=frozenset(skip), replace=replace)


def _apply_fixes(split_dir: str, split_path: str, files: list[str], fixes: FileFixes, seen: set[str]) -> list[str]:
    """Drop or replace the images the list names; the relative paths it matched go into ``seen``."""
    prefix = split_dir.strip("/") + "/"
    cut = len(split_path)
    out = []
    for f in files:
        # ``files`` are joined onto ``split_path``, so a slice is their relative path (os.path.relpath
        # would cost seconds per rank over ImageNet's 1.28M files).
        rel = prefix + f[cut:].replace(os.sep, "/").lstrip("/")
        if rel in fixes.skip:
            seen.add(rel)
        elif rel in fixes.replace:
            seen.add(rel)
            out.append(fixes.replace[rel])
        else:
            out.append(f)
    return out


def _check_fixes_used(root: str, split_dir: str, split_path: str, fixes: FileFixes, seen: set[str]) -> None:
    prefix = split_dir.strip("/") + "/"
    unknown = sorted(r for r in (fixes.skip | set(fixes.replace)) if r.startswith(prefix) and r not in seen)
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(
            f"exclude list {fixes.source} names {len(unknown)} image(s) that are not in {split_path} "
            f"({shown}): it was written for another tree; re-run `python -m pipeline.tools.validate "
            f"{root} --write-list {fixes.source}`"
        )


# --------------------------------------------------------------------------------------------------
# Scanning


def scan_split(split_path: str, *, root: str = "", split_dir: str = "", fixes: FileFixes | None = None) -> SplitIndex:
    """Index one split folder; raise :class:`DataError` for a missing, flat, empty or partly empty split.

    ``fixes`` (with ``root`` and ``split_dir``, which locate the split in the list's paths) removes or
    replaces the images an exclude list names; a class left without images is an error like any other.
    """
    if not _split_exists(split_path):
        raise DataError(f"split folder {split_path} does not exist; expected {split_path}/<class>/<image>")
    classes = list_classes(split_path)
    _check_split_layout(split_path, classes)
    per_class = _split_images(split_path, classes)
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    matched: set[str] = set()
    for label, name in enumerate(classes):
        images = per_class[name]
        if fixes:
            images = _apply_fixes(split_dir, split_path, images, fixes, matched)
        if not images:
            empty.append(name)
        files.extend(images)
        labels.extend([label] * len(images))
    if fixes:
        _check_fixes_used(root, split_dir, split_path, fixes, matched)
    if empty:
        exts = "/".join(IMAGE_EXTENSIONS)
        if len(empty) == len(classes):
            raise DataError(
                f"{split_path} has {len(classes)} class folders but no images ({exts}) in any of them; "
                f"put the images in {split_path}/<class>/"
            )
        shown = ", ".join(_join(split_path, n) for n in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DataError(
            f"{len(empty)} class folder(s) contain no images ({exts}): {shown}; "
            f"add images or remove the folder(s) from both splits"
            + (f" (or take them out of the exclude list {fixes.source})" if fixes else "")
        )
    return SplitIndex(path=split_path, classes=tuple(classes), files=tuple(files), labels=tuple(labels))


def _check_root(root: str, train_dir: str, val_dir: str) -> None:
    if not root:
        raise DataError(
            "data.root is empty; set --data.root to a folder holding "
            f"{train_dir}/<class>/<image> and {val_dir}/<class>/<image>"
        )
    store = Storage(root)
    with _reading(root):
        exists = store.is_dir()
        present = [n for n in store.list_dirs() if not n.startswith(".")] if exists else []
    if is_url(root) and not present:
        raise DataError(
            f"dataset root {root} does not exist or is empty; set --data.root to a prefix holding "
            f"{train_dir}/<class>/<image> and {val_dir}/<class>/<image> (AWS_ENDPOINT_URL selects "
            f"a non-AWS endpoint)"
        )
    if not exists:
        raise DataError(
            f"dataset root {root} {describe_path(root.removeprefix('file://'))}, expected a folder; set "
            f"--data.root to a folder holding "
            f"{train_dir}/<class>/<image> and {val_dir}/<class>/<image>"
        )
    for key, sub in (("train_dir", train_dir), ("val_dir", val_dir)):
        missing = sub not in present
        if missing:
            raise DataError(
                f"dataset root {root} has no {sub}/ folder (data.{key} = {sub!r}); folders there: "
                f"{', '.join(present) or 'none'}. Create {_join(root, sub)}/<class>/<image> "
                f"or set --data.{key} to the right folder name"
            )


def scan_dataset(
    root: str, *, split_dir: str, train_dir: str, val_dir: str, num_classes: int, fixes: FileFixes | None = None
) -> SplitIndex:
    """Index ``root/split_dir`` and check it against the other split and the model.

    The other split only has its class folder names listed (cheap even for ImageNet); its images
    are checked when its own source is built.
    """
    _check_root(root, train_dir, val_dir)
    if fixes:
        stray = sorted(r for r in fixes.skip | set(fixes.replace) if not r.startswith((f"{train_dir}/", f"{val_dir}/")))
        if stray:
            raise DataError(
                f"exclude list {fixes.source} names {len(stray)} path(s) outside {train_dir}/ and "
                f"{val_dir}/ (e.g. {stray[0]!r}); paths are relative to the dataset root {root}"
            )
    index = scan_split(_join(root, split_dir), root=root, split_dir=split_dir, fixes=fixes)
    other_dir = val_dir if split_dir == train_dir else train_dir
    other_path = _join(root, other_dir)
    other = list_classes(other_path)
    _check_split_layout(other_path, other)
    if list(index.classes) != other:
        train_classes, val_classes = (index.classes, other) if split_dir == train_dir else (other, index.classes)
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"class folders differ between {_join(root, train_dir)} and "
            f"{_join(root, val_dir)}: "
            f"only in {train_dir}: {_names(only_train)}; only in {val_dir}: {_names(only_val)}. "
            f"Both splits need the same class folders, or the labels would not mean the same thing"
        )
    if len(index.classes) != num_classes:
        raise DataError(
            f"dataset at {root} has {len(index.classes)} classes but model.num_classes = {num_classes}; "
            f"set --model.num_classes={len(index.classes)}"
        )
    return index


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
