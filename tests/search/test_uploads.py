"""The folder of added images (services/search/uploads.py): files named by id, written whole or not at all,
within a quota that concurrent saves cannot pass together, and never a path outside the folder."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import StorageFullError
from services.search.uploads import UploadFolder

pytestmark = pytest.mark.anyio


def files(folder: Path) -> dict[str, bytes]:
    """Every entry of `folder`, hidden ones (a temporary file left behind) included."""
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()} if folder.is_dir() else {}


async def test_a_saved_image_is_named_by_its_id_in_a_folder_made_on_demand(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path / "state" / "uploads", max_bytes=1024)
    assert await folder.save("3f2a", b"jpeg bytes", "jpg") == "3f2a.jpg"
    assert files(folder.root) == {"3f2a.jpg": b"jpeg bytes"}  # nothing else: no temporary file left
    assert folder.path_of("3f2a.jpg") == (folder.root / "3f2a.jpg").resolve()


async def test_saving_an_id_again_keeps_the_file_and_costs_no_quota(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path, max_bytes=10)
    await folder.save("a", b"0123456789", "png")  # the quota, exactly
    assert await folder.save("a", b"0123456789", "png") == "a.png"  # already there: nothing to add
    assert files(tmp_path) == {"a.png": b"0123456789"}


async def test_a_save_past_the_quota_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path, max_bytes=100)
    await folder.save("a", b"x" * 60, "jpg")
    with pytest.raises(StorageFullError) as refused:
        await folder.save("b", b"y" * 41, "jpg")
    assert refused.value.status_code == 507
    assert "holds 60 bytes" in refused.value.message and "CBIR_MAX_UPLOAD_STORAGE_BYTES" in refused.value.message
    assert files(tmp_path) == {"a.jpg": b"x" * 60}
    await folder.save("c", b"z" * 40, "jpg")  # up to the quota is fine
    assert sorted(files(tmp_path)) == ["a.jpg", "c.jpg"]


class WatchedLock(asyncio.Lock):
    """The folder's lock, telling when a save finds another one holding it."""

    def __init__(self) -> None:
        super().__init__()
        self.contended = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.contended.set()
        return await super().acquire()


async def test_a_save_waits_for_the_one_writing_so_two_cannot_pass_the_quota_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = UploadFolder(tmp_path, max_bytes=100)
    folder._lock = lock = WatchedLock()
    writing, gate = threading.Event(), threading.Event()
    mkstemp = tempfile.mkstemp

    def held_mkstemp(**options: Any) -> tuple[int, str]:  # the first save stops past its quota check, unwritten
        if not writing.is_set():
            writing.set()
            gate.wait(timeout=30)
        return mkstemp(**options)

    monkeypatch.setattr(tempfile, "mkstemp", held_mkstemp)  # the one write_atomically calls
    first = asyncio.ensure_future(folder.save("a", b"x" * 60, "jpg"))
    await asyncio.to_thread(writing.wait, 10)
    second = asyncio.ensure_future(folder.save("b", b"y" * 60, "jpg"))  # would fit beside no file, not beside a
    try:
        async with asyncio.timeout(10):
            await lock.contended.wait()  # the second waits while the first writes ...
    finally:
        gate.set()
    assert await first == "a.jpg"
    with pytest.raises(StorageFullError):  # ... then counts the first's bytes
        await second
    assert files(tmp_path) == {"a.jpg": b"x" * 60}


async def test_deleted_images_give_their_quota_back(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path, max_bytes=50)
    await folder.save("a", b"x" * 50, "jpg")
    await folder.delete("a.jpg")
    assert files(tmp_path) == {} and folder.path_of("a.jpg") is None
    await folder.save("b", b"y" * 50, "jpg")
    await folder.delete("a.jpg")  # already gone: nothing to do


async def test_a_write_that_fails_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_failure(fd: int) -> None:
        raise OSError(5, "Input/output error")

    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", disk_failure)
    folder = UploadFolder(tmp_path, max_bytes=100)
    with pytest.raises(OSError, match="Input/output error"):
        await folder.save("a", b"x" * 10, "jpg")
    assert files(tmp_path) == {}  # neither the image nor its temporary file
    monkeypatch.setattr(os, "fsync", fsync)
    assert await folder.save("a", b"x" * 10, "jpg") == "a.jpg"  # and the next try starts afresh


@pytest.fixture
def folder_with_neighbours(tmp_path: Path) -> UploadFolder:
    """An upload folder with one image, beside a secret and the collection, and a link out of it."""
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (tmp_path / "collection").mkdir()
    (tmp_path / "collection" / "cat.jpg").write_bytes(b"cat")
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "mine.jpg").write_bytes(b"mine")
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    return UploadFolder(root, max_bytes=1024)


@pytest.mark.parametrize("relative", ["../secret.jpg", "../collection/cat.jpg", "link.jpg", "{tmp}/secret.jpg",
                                      ".", "missing.jpg"])
async def test_nothing_outside_the_folder_is_found_or_deleted(folder_with_neighbours: UploadFolder,
                                                              relative: str) -> None:
    folder, outside = folder_with_neighbours, folder_with_neighbours.root.parent
    relative = relative.format(tmp=outside)
    assert folder.path_of(relative) is None
    await folder.delete(relative)
    assert (outside / "secret.jpg").read_bytes() == b"secret"
    assert (outside / "collection" / "cat.jpg").read_bytes() == b"cat"
    assert (folder.root / "mine.jpg").exists()


def test_a_folder_not_made_yet_holds_nothing(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path / "never-saved", max_bytes=1024)
    assert folder.path_of("a.jpg") is None and not folder.root.exists()
