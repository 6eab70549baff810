"""Image collections on disk: `<root>/<split>/<class>/<image>` (torchvision's ImageFolder, CIFAR-10's
layout), `<root>/<class>/<image>`, or a flat folder of images without labels."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from services.common.documents import document_id
from services.common.errors import CollectionError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Where a collection is looked for when none is configured: a local copy, then the shared one.
DEFAULT_DATA_DIRS = (Path("data/cifar10"), REPO_ROOT / "data/cifar10", REPO_ROOT / "../shared/cifar10")


class Layout(StrEnum):
    """How a collection's folders give its images' labels (`cbir index --layout`)."""

    auto = "auto"  # split if <root>/<split>/ holds class folders, else class if <root> holds only folders, else flat
    split = "split"  # <root>/<split>/<class>/.../<image>: one split of it, labelled by class
    class_ = "class"  # <root>/<class>/.../<image>: labelled by the top folder
    flat = "flat"  # <root>/.../<image>: every image below the root, labels null


@dataclass(frozen=True, slots=True)
class CollectionImage:
    """One image file of a collection, with its deterministic document id; `size` and `mtime` as
    `stat` gave them when the collection was listed (None when it was not asked to)."""

    id: str
    source: str  # the collection root, resolved
    path: str  # relative to the collection root, forward slashes
    filename: str
    label: str | None
    size: int | None = None
    mtime: float | None = None

    @classmethod
    def from_relative(cls, source: str, relative: str, label: str | None, *, size: int | None = None,
                      mtime: float | None = None) -> CollectionImage:
        return cls(id=document_id(source, relative), source=source, path=relative,
                   filename=relative.rsplit("/", 1)[-1], label=label, size=size, mtime=mtime)


def find_data_dir(configured: Path | None) -> Path:
    """The configured collection root, else the first default location that exists."""
    if configured is not None:
        if not configured.is_dir():
            raise CollectionError(f"the collection root {configured} is not a directory")
        return configured.resolve()
    for candidate in DEFAULT_DATA_DIRS:
        if (candidate / "train").is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in DEFAULT_DATA_DIRS)
    raise CollectionError(
        f"no image collection found (tried {tried}); set CBIR_DATA_DIR to a folder laid out as "
        "<split>/<class>/<image>, or run `cbir download-cifar10` on a machine with internet"
    )


def list_classes(root: Path, split: str) -> list[str]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise CollectionError(f"{split_dir} does not exist; expected <root>/<split>/<class>/<image>")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise CollectionError(f"{split_dir} has no class folders")
    return classes


def iter_images(root: Path, split: str) -> Iterator[CollectionImage]:
    """Every image of a split, in a stable order (class, then file name)."""
    source = str(root.resolve())
    for label in list_classes(root, split):
        class_dir = root / split / label
        for name in sorted(os.listdir(class_dir)):
            if _is_image(name):
                yield CollectionImage.from_relative(source, f"{split}/{label}/{name}", label)


def resolve_layout(root: Path, layout: Layout, *, split: str) -> Layout:
    """The layout `auto` stands for in `root` (the rule is `Layout.auto`'s comment); others as they are."""
    if layout is not Layout.auto:
        return layout
    split_dir = root / split
    if split_dir.is_dir() and any(entry.is_dir() for entry in os.scandir(split_dir)):
        return Layout.split
    entries = [entry for entry in os.scandir(root) if not entry.name.startswith(".")]
    if entries and all(entry.is_dir() for entry in entries):
        return Layout.class_
    return Layout.flat


def scan_collection(root: Path, *, layout: Layout = Layout.auto, split: str = "train") -> list[CollectionImage]:
    """Every image of the collection at `root` in the given layout, recursively, in a stable order, with
    its size and mtime (None for a file that cannot be read). Hidden files and folders are left out."""
    if not root.is_dir():
        raise CollectionError(f"the collection root {root} is not a directory")
    root = root.resolve()
    source = str(root)
    layout = resolve_layout(root, layout, split=split)
    if layout is Layout.split:
        labelled = [(label, root / split / label) for label in list_classes(root, split)]
    elif layout is Layout.class_:
        labelled = [(entry.name, Path(entry.path)) for entry in sorted(os.scandir(root), key=lambda e: e.name)
                    if entry.is_dir() and not entry.name.startswith(".")]
    else:
        labelled = [(None, root)]
    images = []
    for label, folder in labelled:
        for path, stat in _walk_images(folder):
            relative = path.relative_to(root).as_posix()
            images.append(CollectionImage.from_relative(source, relative, label, size=stat and stat.st_size,
                                                        mtime=stat and stat.st_mtime))
    return images


def _walk_images(folder: Path) -> Iterator[tuple[Path, os.stat_result | None]]:
    """Image files below `folder` in order, with their stat (None for one that cannot be read: a dangling link,
    or removed meanwhile; the indexer lists it as skipped)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))  # walked in order
        for name in sorted(filenames):
            if _is_image(name):
                path = Path(dirpath) / name
                try:
                    yield path, path.stat()
                except OSError:
                    yield path, None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def resolve_inside(root: Path, relative: str) -> Path | None:
    """The real path of the file `relative` under `root`, or None if it escapes the root (.., symlinks), is no
    file, or is no usable path at all (a NUL byte, a name too long, a symlink loop): a stored path is data."""
    try:
        real_root = root.resolve()
        candidate = (real_root / relative).resolve()
        if not candidate.is_relative_to(real_root) or not candidate.is_file():
            return None
    except (OSError, ValueError, RuntimeError):
        return None
    return candidate
