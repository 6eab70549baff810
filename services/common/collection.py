"""Image collections laid out as `<root>/<split>/<class>/<image>` (torchvision's ImageFolder)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.documents import document_id
from services.common.errors import CollectionError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Where a collection is looked for when none is configured: a local copy, then the shared one.
DEFAULT_DATA_DIRS = (Path("data/cifar10"), REPO_ROOT / "data/cifar10", REPO_ROOT / "../shared/cifar10")


@dataclass(frozen=True, slots=True)
class CollectionImage:
    """One image file of a collection, with its deterministic document id."""

    id: str
    path: str  # relative to the collection root, forward slashes
    filename: str
    label: str

    @classmethod
    def from_relative(cls, relative: str, label: str) -> CollectionImage:
        return cls(id=document_id(relative), path=relative, filename=relative.rsplit("/", 1)[-1], label=label)


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
    for label in list_classes(root, split):
        class_dir = root / split / label
        for name in sorted(os.listdir(class_dir)):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield CollectionImage.from_relative(f"{split}/{label}/{name}", label)


def resolve_inside(root: Path, relative: str) -> Path | None:
    """The real path of `relative` under `root`, or None if it escapes the root (.., symlinks)."""
    real_root = root.resolve()
    candidate = (real_root / relative).resolve()
    if not candidate.is_relative_to(real_root) or not candidate.is_file():
        return None
    return candidate
