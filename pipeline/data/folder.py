"""ImageFolder datasets: ``<root>/<split>/<class>/<image>``, scanned and validated up front.

The file and label lists built here are handed to ``fn.readers.file`` explicitly instead of letting
DALI walk ``file_root`` itself: that way the class index is ours (sorted folder names, as
torchvision's ImageFolder), and every layout mistake becomes a :class:`DataError` naming the path
before a pipeline or a process group exists, instead of a C++ exception on one rank mid-job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared case-insensitively (.JPEG is ImageNet's)


@dataclass(frozen=True)
class SplitIndex:
    """Every image of one split, in a fixed order, with its class index."""

    path: str  # the split folder
    classes: tuple[str, ...]  # class folder names; a label is a position in this tuple
    files: tuple[str, ...]  # absolute paths, grouped by class, sorted within a class
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_classes(split_path: str) -> list[str]:
    """Sorted class folder names of a split; hidden folders (``.ipynb_checkpoints``) are not classes."""
    with os.scandir(split_path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _class_images(class_path: str) -> list[str]:
    # Same walk and order as torchvision's ImageFolder, so sample order matches it; symlinked
    # trees (a common way to assemble ImageNet splits) are followed.
    found = []
    for dirpath, _, filenames in sorted(os.walk(class_path, followlinks=True)):
        rel = os.path.relpath(dirpath, class_path)
        if rel != "." and any(part.startswith(".") for part in rel.split(os.sep)):
            continue
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _check_split_layout(split_path: str, classes: list[str]) -> None:
    if classes:
        return
    with os.scandir(split_path) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith("."))
    if not names:
        raise DataError(f"{split_path} is empty: expected an ImageFolder layout {split_path}/<class>/<image> "
                        f"with one folder per class")
    loose = [n for n in names if _is_image(n)]
    what = f"{len(loose)} images directly in it (e.g. {loose[0]!r})" if loose else f"only files ({names[0]!r}, ...)"
    raise DataError(f"{split_path} is not an ImageFolder layout: expected {split_path}/<class>/<image>, but it has "
                    f"no class folders and {what}; move the images into one sub-folder per class")


def scan_split(split_path: str) -> SplitIndex:
    """Index one split folder; raise :class:`DataError` for a missing, flat, empty or partly empty split."""
    if not os.path.isdir(split_path):
        raise DataError(f"split folder {split_path} does not exist; expected {split_path}/<class>/<image>")
    classes = list_classes(split_path)
    _check_split_layout(split_path, classes)
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        images = _class_images(os.path.join(split_path, name))
        if not images:
            empty.append(name)
        files.extend(images)
        labels.extend([label] * len(images))
    if empty:
        exts = "/".join(IMAGE_EXTENSIONS)
        if len(empty) == len(classes):
            raise DataError(f"{split_path} has {len(classes)} class folders but no images ({exts}) in any of them; "
                            f"put the images in {split_path}/<class>/")
        shown = ", ".join(os.path.join(split_path, n) for n in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DataError(f"{len(empty)} class folder(s) contain no images ({exts}): {shown}; "
                        f"add images or remove the folder(s) from both splits")
    return SplitIndex(path=split_path, classes=tuple(classes), files=tuple(files), labels=tuple(labels))


def _check_root(root: str, train_dir: str, val_dir: str) -> None:
    if not root:
        raise DataError("data.root is empty; set --data.root to a folder holding "
                        f"{train_dir}/<class>/<image> and {val_dir}/<class>/<image>")
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root} does not exist; set --data.root to a folder holding "
                        f"{train_dir}/<class>/<image> and {val_dir}/<class>/<image>")
    for key, sub in (("train_dir", train_dir), ("val_dir", val_dir)):
        if not os.path.isdir(os.path.join(root, sub)):
            with os.scandir(root) as entries:
                present = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
            raise DataError(f"dataset root {root} has no {sub}/ folder (data.{key} = {sub!r}); folders there: "
                            f"{', '.join(present) or 'none'}. Create {os.path.join(root, sub)}/<class>/<image> "
                            f"or set --data.{key} to the right folder name")


def scan_dataset(root: str, *, split_dir: str, train_dir: str, val_dir: str, num_classes: int) -> SplitIndex:
    """Index ``root/split_dir`` and check it against the other split and the model.

    The other split only has its class folder names listed (cheap even for ImageNet); its images
    are checked when its own source is built.
    """
    _check_root(root, train_dir, val_dir)
    index = scan_split(os.path.join(root, split_dir))
    other_dir = val_dir if split_dir == train_dir else train_dir
    other_path = os.path.join(root, other_dir)
    other = list_classes(other_path)
    _check_split_layout(other_path, other)
    if list(index.classes) != other:
        train_classes, val_classes = (index.classes, other) if split_dir == train_dir else (other, index.classes)
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"class folders differ between {os.path.join(root, train_dir)} and "
                        f"{os.path.join(root, val_dir)}: "
                        f"only in {train_dir}: {_names(only_train)}; only in {val_dir}: {_names(only_val)}. "
                        f"Both splits need the same class folders, or the labels would not mean the same thing")
    if len(index.classes) != num_classes:
        raise DataError(f"dataset at {root} has {len(index.classes)} classes but model.num_classes = {num_classes}; "
                        f"set --model.num_classes={len(index.classes)}")
    return index


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
