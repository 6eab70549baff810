"""Image collections on disk (services/common/collection.py): where the collection is found, which layout
gives its labels, the images listed below it in a stable order with their stat, and paths that never leave
the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common import collection
from services.common.collection import (
    CollectionImage,
    Layout,
    find_data_dir,
    iter_images,
    list_classes,
    resolve_inside,
    resolve_layout,
    scan_collection,
)
from services.common.documents import document_id
from services.common.errors import CollectionError


def touch(root: Path, *relatives: str, data: bytes = b"img") -> Path:
    """Files under `root` (folders made as needed); returns `root`."""
    for relative in relatives:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def listed(images: list[CollectionImage]) -> list[tuple[str, str | None]]:
    return [(image.path, image.label) for image in images]


# --- find_data_dir ------------------------------------------------------------------------------


def test_a_configured_root_is_used_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert find_data_dir(Path("mine")) == tmp_path.resolve() / "mine"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_configured_root_that_is_not_a_folder_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    configured = tmp_path / "nowhere"
    if kind == "file":
        configured.write_text("not a folder")
    with pytest.raises(CollectionError, match="is not a directory") as refused:
        find_data_dir(configured)
    assert str(configured) in refused.value.message


def test_without_a_configured_root_the_first_default_with_a_train_split_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty, without_train, first, second = (tmp_path / name for name in ("empty", "no-train", "first", "second"))
    empty.mkdir()
    (without_train / "test").mkdir(parents=True)
    (first / "train").mkdir(parents=True)
    (second / "train").mkdir(parents=True)
    monkeypatch.setattr(collection, "DEFAULT_DATA_DIRS", (tmp_path / "absent", empty, without_train, first, second))
    assert find_data_dir(None) == first.resolve()


def test_without_any_collection_the_error_lists_where_it_looked_and_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried = (tmp_path / "a", tmp_path / "b")
    monkeypatch.setattr(collection, "DEFAULT_DATA_DIRS", tried)
    with pytest.raises(CollectionError, match="no image collection found") as refused:
        find_data_dir(None)
    assert all(str(path) in refused.value.message for path in tried)
    assert "CBIR_DATA_DIR" in refused.value.message


# --- list_classes and iter_images (the split layout) --------------------------------------------


def test_classes_are_the_split_folders_in_order(tmp_path: Path) -> None:
    touch(tmp_path, "train/dog/1.jpg", "train/cat/1.jpg", "train/notes.txt", "test/bird/1.jpg")
    assert list_classes(tmp_path, "train") == ["cat", "dog"]


def test_a_missing_split_or_one_without_class_folders_is_a_collection_error(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="does not exist"):
        list_classes(tmp_path, "train")
    touch(tmp_path, "train/loose.jpg")
    with pytest.raises(CollectionError, match="has no class folders"):
        list_classes(tmp_path, "train")


def test_iter_images_lists_a_split_by_class_then_name_with_deterministic_ids(tmp_path: Path) -> None:
    touch(tmp_path, "train/dog/b.png", "train/dog/a.JPG", "train/cat/z.jpeg", "train/cat/readme.txt",
          "train/cat/.hidden.jpg", "test/cat/other.jpg")
    images = list(iter_images(tmp_path, "train"))
    assert listed(images) == [("train/cat/z.jpeg", "cat"), ("train/dog/a.JPG", "dog"), ("train/dog/b.png", "dog")]
    source = str(tmp_path.resolve())
    assert all(image.source == source and image.id == document_id(source, image.path) for image in images)
    assert [image.filename for image in images] == ["z.jpeg", "a.JPG", "b.png"]
    assert all(image.size is None and image.mtime is None for image in images)  # not stat-ed


# --- resolve_layout -----------------------------------------------------------------------------


@pytest.mark.parametrize(("files", "expected"), [
    (["train/cat/1.jpg", "test/cat/1.jpg"], Layout.split),
    (["cat/1.jpg", "dog/1.jpg", ".DS_Store"], Layout.class_),  # hidden entries do not make it flat
    (["train/1.jpg", "train/2.jpg"], Layout.class_),  # <root>/train holds no folders: one class called train
    (["cat/1.jpg", "loose.jpg"], Layout.flat),
    (["1.jpg", "2.jpg"], Layout.flat),
    ([], Layout.flat),
])
def test_auto_stands_for_the_layout_the_folders_show(tmp_path: Path, files: list[str], expected: Layout) -> None:
    touch(tmp_path, *files)
    assert resolve_layout(tmp_path, Layout.auto, split="train") is expected


def test_auto_looks_for_the_split_it_is_given(tmp_path: Path) -> None:
    touch(tmp_path, "val/cat/1.jpg")
    assert resolve_layout(tmp_path, Layout.auto, split="val") is Layout.split
    assert resolve_layout(tmp_path, Layout.auto, split="train") is Layout.class_


@pytest.mark.parametrize("layout", [Layout.split, Layout.class_, Layout.flat])
def test_a_layout_asked_for_is_kept_whatever_the_folders_show(tmp_path: Path, layout: Layout) -> None:
    touch(tmp_path, "1.jpg")
    assert resolve_layout(tmp_path, layout, split="train") is layout


# --- scan_collection ----------------------------------------------------------------------------


def test_the_split_layout_is_scanned_recursively_below_each_class(tmp_path: Path) -> None:
    touch(tmp_path, "train/cat/b.jpg", "train/cat/kittens/a.jpg", "train/dog/deep/er/c.png", "test/cat/t.jpg",
          "train/dog/notes.md")
    assert listed(scan_collection(tmp_path)) == [
        ("train/cat/b.jpg", "cat"), ("train/cat/kittens/a.jpg", "cat"), ("train/dog/deep/er/c.png", "dog")]
    assert listed(scan_collection(tmp_path, split="test")) == [("test/cat/t.jpg", "cat")]


def test_the_class_layout_labels_by_the_top_folder(tmp_path: Path) -> None:
    touch(tmp_path, "dog/1.jpg", "cat/sub/2.jpg", ".trash/cat/3.jpg")
    assert listed(scan_collection(tmp_path)) == [("cat/sub/2.jpg", "cat"), ("dog/1.jpg", "dog")]


def test_the_flat_layout_takes_every_image_below_the_root_unlabelled(tmp_path: Path) -> None:
    touch(tmp_path, "b.jpg", "a/c.webp", "a/b/d.TIFF", "e.txt", ".hidden/f.jpg", "a/.g.jpg")
    # A folder's own images first, then its subfolders', each in name order
    assert listed(scan_collection(tmp_path)) == [("b.jpg", None), ("a/c.webp", None), ("a/b/d.TIFF", None)]


def test_a_layout_asked_for_overrides_auto(tmp_path: Path) -> None:
    touch(tmp_path, "train/cat/1.jpg")
    assert listed(scan_collection(tmp_path, layout=Layout.flat)) == [("train/cat/1.jpg", None)]
    assert listed(scan_collection(tmp_path, layout=Layout.class_)) == [("train/cat/1.jpg", "train")]


def test_each_image_carries_its_id_source_size_and_mtime(tmp_path: Path) -> None:
    touch(tmp_path, "cat/1.jpg", data=b"12345")
    os.utime(tmp_path / "cat/1.jpg", (1_000_000.0, 1_234_567.5))
    [image] = scan_collection(tmp_path)
    source = str(tmp_path.resolve())
    assert image == CollectionImage(id=document_id(source, "cat/1.jpg"), source=source, path="cat/1.jpg",
                                    filename="1.jpg", label="cat", size=5, mtime=1_234_567.5)


def test_an_image_that_cannot_be_stat_ed_is_listed_without_size(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "gone.jpg")  # dangling: the indexer lists it as skipped
    a, b = scan_collection(tmp_path)
    assert (a.path, a.size) == ("a.jpg", 3)
    assert (b.path, b.size, b.mtime) == ("b.jpg", None, None)


def test_scanning_is_stable_and_the_same_through_a_symlinked_root(tmp_path: Path) -> None:
    root = touch(tmp_path / "real", "cat/2.jpg", "cat/1.jpg", "dog/1.jpg")
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    first = scan_collection(root)
    assert scan_collection(root) == first
    assert scan_collection(tmp_path / "link") == first  # the root is resolved: the same source, the same ids


def test_scanning_a_root_that_is_not_a_folder_is_a_collection_error(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="is not a directory"):
        scan_collection(tmp_path / "nowhere")
    touch(tmp_path, "a.jpg")
    with pytest.raises(CollectionError, match="is not a directory"):
        scan_collection(tmp_path / "a.jpg")


def test_the_split_layout_without_class_folders_is_a_collection_error(tmp_path: Path) -> None:
    touch(tmp_path, "train/1.jpg")
    with pytest.raises(CollectionError, match="has no class folders"):
        scan_collection(tmp_path, layout=Layout.split)


# --- resolve_inside -----------------------------------------------------------------------------


@pytest.fixture
def trapped_root(tmp_path: Path) -> Path:
    """A root with one image, an alias of it, and links out of it to a secret beside the root."""
    root = touch(tmp_path / "root", "cat/ok.jpg")
    touch(tmp_path, "secret.jpg", "outside/secret.jpg")
    (root / "cat/alias.jpg").symlink_to("ok.jpg")
    (root / "cat/evil.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    return root


def test_a_file_inside_the_root_resolves_to_its_real_path(trapped_root: Path) -> None:
    real = trapped_root.resolve() / "cat/ok.jpg"
    assert resolve_inside(trapped_root, "cat/ok.jpg") == real
    assert resolve_inside(trapped_root, "cat/../cat/ok.jpg") == real  # `..` that stays inside is fine
    assert resolve_inside(trapped_root, "cat/alias.jpg") == real  # a link that stays inside too


@pytest.mark.parametrize("relative", [
    "../secret.jpg", "cat/../../secret.jpg", "../" * 30 + "etc/passwd",  # `..` out of the root
    "/etc/passwd", "{tmp}/secret.jpg",  # absolute paths
    "cat/evil.jpg", "linked/secret.jpg",  # symlinks out of it, to a file and through a folder
    "cat", ".", "cat/missing.jpg",  # not a file
])
def test_nothing_outside_the_root_or_not_a_file_is_resolved(trapped_root: Path, relative: str) -> None:
    assert resolve_inside(trapped_root, relative.format(tmp=trapped_root.parent)) is None


@pytest.mark.parametrize("relative", ["cat/ok.jpg\x00.png", "x" * 5000, "cat/loop.jpg"])
def test_an_unusable_name_never_yields_a_path(trapped_root: Path, relative: str) -> None:
    # A stored path is data: a NUL byte, a name too long or a symlink loop is no file, not an exception.
    (trapped_root / "cat/loop.jpg").symlink_to("loop.jpg")
    assert resolve_inside(trapped_root, relative) is None
