"""Where added images are kept: `<state dir>/uploads/<id>.<ext>`, re-encoded, within a quota.

The file is named by the document id (the hash of the uploaded bytes), never by the client's file
name, and holds the image re-encoded from its decoded pixels (`reencode_image`: no EXIF, GPS or
other metadata survives). Each file is written to a temporary name, fsynced and renamed into
place, so a crash leaves either the whole file or none.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from services.common.collection import resolve_inside
from services.common.errors import StorageFullError
from services.common.files import write_atomically

logger = logging.getLogger(__name__)


class UploadFolder:
    """The folder of added images, at most `max_bytes` in all.

    >>> folder = UploadFolder(Path("state/uploads"), max_bytes=2**30)
    >>> relative = await folder.save("3f2a...", encoded, "jpg")   # "3f2a....jpg"
    >>> folder.path_of(relative)
    """

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = asyncio.Lock()  # one save at a time: the quota check and the write go together

    async def save(self, id: str, data: bytes, extension: str) -> str:
        """Write the file of document `id`; returns its path relative to the folder. `StorageFullError`
        (nothing written) when the folder would grow past its quota."""
        relative = f"{id}.{extension}"
        async with self._lock:
            await asyncio.to_thread(self._save, relative, data)
        return relative

    def _save(self, relative: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / relative
        if target.exists():  # the same id: the same bytes, already there
            return
        used = sum(entry.stat().st_size for entry in os.scandir(self.root) if entry.is_file())
        if used + len(data) > self.max_bytes:
            raise StorageFullError(
                f"the uploads folder holds {used} bytes; adding {len(data)} would pass its quota of "
                f"{self.max_bytes} (CBIR_MAX_UPLOAD_STORAGE_BYTES); delete images or raise the quota")
        write_atomically(target, lambda file: file.write(data), temp_prefix=".")

    async def delete(self, relative: str) -> None:
        path = self.path_of(relative)
        if path is not None:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    def path_of(self, relative: str) -> Path | None:
        """The file of an added image, never a path outside the folder."""
        if not self.root.is_dir():
            return None
        return resolve_inside(self.root, relative)
