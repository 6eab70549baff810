"""DuplicateFinder: one job per collection revision and threshold, its result kept, files signed once, a failed
job forgotten, and the near-duplicate check of uploads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from duplicates_calibration import variants
from factories import make_document

from services.common.documents import StoredImage
from services.common.errors import StoreUnavailableError
from services.search.duplicate_jobs import CollectionView, DuplicateFinder, DuplicateProgress, DuplicateReport
from services.search.duplicates import DEFAULT_THRESHOLD, image_signature

pytestmark = pytest.mark.anyio


class Files:
    """A collection of files on disk, and how often each was read."""

    def __init__(self, root: Path, mini_collection: Path) -> None:
        self.documents: list[StoredImage] = []
        self.reads: list[str] = []
        self.fail = False
        for number, source in enumerate(sorted((mini_collection / "train" / "cat").iterdir())[:4]):
            made = variants(source.read_bytes())
            for kind in ("original", "jpeg"):
                self.add(root / f"{number}-{kind}.img", made[kind])

    def add(self, path: Path, data: bytes) -> StoredImage:
        path.write_bytes(data)
        document = make_document(path.name, np.ones(4, np.float32), size=len(data), mtime=1.0, path=str(path)).stored()
        self.documents.append(document)
        return document

    def view(self, revision: object) -> CollectionView:
        async def documents() -> AsyncIterator[StoredImage]:
            if self.fail:
                raise StoreUnavailableError("the store is down")
            for document in list(self.documents):
                yield document

        def path_of(document: StoredImage) -> Path:
            self.reads.append(document.id)
            return Path(document.path)

        return CollectionView(revision=revision, documents=documents, path_of=path_of)


@pytest.fixture
def files(tmp_path: Path, mini_collection: Path) -> Files:
    return Files(tmp_path, mini_collection)


async def test_the_result_is_kept_per_revision_and_files_are_signed_once(files: Files) -> None:
    finder = DuplicateFinder(wait_s=30)
    first = await finder.find(files.view(1), threshold=DEFAULT_THRESHOLD)
    assert isinstance(first, DuplicateReport) and first.documents == 8
    assert sorted(len(group.members) for group in first.groups) == [2, 2, 2, 2]
    assert await finder.find(files.view(1), threshold=DEFAULT_THRESHOLD) is first  # kept
    assert len(files.reads) == 8
    other = await finder.find(files.view(1), threshold=0.999)
    assert other is not first and len(files.reads) == 8  # another threshold: no file read again
    files.add(Path(files.documents[0].path + ".png"), b"not an image")
    changed = await finder.find(files.view(2), threshold=DEFAULT_THRESHOLD)
    assert changed is not first and changed.unreadable == [files.documents[-1].id]
    assert len(files.reads) == 9  # only the new file was read


async def test_a_slow_job_answers_its_progress_and_a_failed_one_is_forgotten(files: Files) -> None:
    finder = DuplicateFinder(wait_s=0)
    pending = await finder.find(files.view(1), threshold=DEFAULT_THRESHOLD)
    assert isinstance(pending, DuplicateProgress)
    finder.wait_s = 30
    assert isinstance(await finder.find(files.view(1), threshold=DEFAULT_THRESHOLD), DuplicateReport)
    files.fail = True
    with pytest.raises(StoreUnavailableError):
        await finder.find(files.view(2), threshold=DEFAULT_THRESHOLD)
    files.fail = False
    assert isinstance(await finder.find(files.view(2), threshold=DEFAULT_THRESHOLD), DuplicateReport)  # started again
    await finder.close()


async def test_uploads_are_checked_once_the_collection_is_signed(files: Files, tmp_path: Path) -> None:
    finder = DuplicateFinder(wait_s=30)
    copy = variants(Path(files.documents[0].path).read_bytes())["bright"]
    signature = image_signature(copy)
    assert finder.near_duplicates(signature, threshold=DEFAULT_THRESHOLD, exclude="new") is None  # nothing signed yet
    await finder.find(files.view(1), threshold=DEFAULT_THRESHOLD)
    found = finder.near_duplicates(signature, threshold=DEFAULT_THRESHOLD, exclude="new")
    assert set(found) == {files.documents[0].id, files.documents[1].id}
    upload = files.add(tmp_path / "upload.png", copy)
    finder.remember(upload, signature)
    again = finder.near_duplicates(image_signature(variants(copy)["shift"]), threshold=DEFAULT_THRESHOLD, exclude="x")
    assert upload.id in again
    finder.forget(files.documents[0].id)
    left = finder.near_duplicates(signature, threshold=DEFAULT_THRESHOLD, exclude=upload.id)
    assert files.documents[0].id not in left
