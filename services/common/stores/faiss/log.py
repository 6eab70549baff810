"""The FAISS store's write-ahead log: each write appended to a file beside the index (`WriteLog`), so a write costs an
append and an fsync instead of a rewrite of the index file; replayed on open (`read_log`) and folded into the index
file now and then by the store.

Files: `<index>.<generation>.log`, generation a growing integer. The index file records the first generation it does
not hold (`log_from`): the logs from there on are replayed in generation order; older ones are what a fold killed
before it removed them, and are ignored (then removed by the next writer). A log file is `CBIRLOG1` then records,
each `<u32 length><u32 crc32 of the payload>` and the payload (little-endian); the payload is `<u32 n>`, an n-byte
UTF-8 JSON header, then the float32 vectors of the documents it writes, row after row:

    {"op": "upsert", "model_version": "...", "documents": [{"id": ..., "filename": ..., ...}, ...]}
    {"op": "delete", "ids": ["...", ...]}

Replaying is idempotent (an upsert overwrites by id, a delete of a missing id does nothing). A record cut short or
failing its checksum (a write killed half-way, never acknowledged) ends the replay of its file, with a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from services.common.documents import ImageDocument, StoredImage

logger = logging.getLogger(__name__)

MAGIC = b"CBIRLOG1"
_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
_HEADER_LENGTH = struct.Struct("<I")
_FIELDS = tuple(f.name for f in dataclasses.fields(StoredImage))


def log_files(index_path: Path) -> list[tuple[int, Path]]:
    """The log files beside the index at `index_path`, as (generation, path), in generation order."""
    pattern = re.compile(re.escape(index_path.name) + r"\.(\d+)\.log")
    found = [(int(match.group(1)), path) for path in index_path.parent.glob(index_path.name + ".*.log")
             if (match := pattern.fullmatch(path.name))]
    return sorted(found)


def upsert_record(documents: Sequence[ImageDocument], vectors: np.ndarray, *, model_version: str | None) -> bytes:
    """The record of an upsert of `documents` with `vectors` (one row each)."""
    header = {"op": "upsert", "model_version": model_version,
              "documents": [{name: getattr(doc, name) for name in _FIELDS} for doc in documents]}
    return _framed(header, np.ascontiguousarray(vectors, dtype="<f4").tobytes())


def delete_record(ids: Sequence[str]) -> bytes:
    """The record of a delete of `ids`."""
    return _framed({"op": "delete", "ids": list(ids)}, b"")


def _framed(header: dict, tail: bytes) -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    payload = _HEADER_LENGTH.pack(len(encoded)) + encoded + tail
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclasses.dataclass(frozen=True)
class LoggedWrite:
    """One record read back: an upsert (`documents`, with their vectors) or a delete (`ids`)."""

    op: str
    documents: tuple[ImageDocument, ...] = ()
    ids: tuple[str, ...] = ()
    model_version: str | None = None


def read_log(path: Path) -> Iterator[LoggedWrite]:
    """The writes recorded in the log file at `path`, in order, up to the first record cut short or corrupt."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        if data and not MAGIC.startswith(data):  # an empty or half-written magic is a file killed at its creation
            logger.warning("%s is not a write log of this store; ignoring it", path)
        return
    offset = len(MAGIC)
    while offset < len(data):
        write = _record_at(data, offset)
        if write is None:
            logger.warning("ignoring a torn or corrupt record at byte %d of %s (%d bytes not replayed): a write "
                           "killed before it was acknowledged", offset, path, len(data) - offset)
            return
        offset, logged = write
        yield logged


def _record_at(data: bytes, offset: int) -> tuple[int, LoggedWrite] | None:
    """The record at `offset` and the offset after it; None when it is cut short or fails its checksum."""
    if offset + _FRAME.size > len(data):
        return None
    length, crc = _FRAME.unpack_from(data, offset)
    start, end = offset + _FRAME.size, offset + _FRAME.size + length
    if end > len(data) or zlib.crc32(data[start:end]) != crc or length < _HEADER_LENGTH.size:
        return None
    (header_length,) = _HEADER_LENGTH.unpack_from(data, start)
    header = json.loads(data[start + _HEADER_LENGTH.size:start + _HEADER_LENGTH.size + header_length])
    if header["op"] == "delete":
        return end, LoggedWrite("delete", ids=tuple(header["ids"]))
    fields = header["documents"]
    vectors = np.frombuffer(data, dtype="<f4", count=(end - start - _HEADER_LENGTH.size - header_length) // 4,
                            offset=start + _HEADER_LENGTH.size + header_length).reshape(len(fields), -1)
    documents = tuple(ImageDocument(**doc, vector=vector.astype(np.float32))
                      for doc, vector in zip(fields, vectors, strict=True))
    return end, LoggedWrite("upsert", documents=documents, model_version=header.get("model_version"))


class WriteLog:
    """The log the store's writer appends to: `append` (on the event loop, under the store's lock, so records keep
    the order of the writes), `sync` (waits until every record appended so far is on disk; concurrent callers share
    one fsync), `rotate` (a fold starts: later records go to a new generation) and `discard_before`.

    >>> log = WriteLog(Path("state/index.npz"), start=saved.log_from)
    >>> log.append(delete_record(["doc-1"])); await log.sync()  # durable from here on
    """

    def __init__(self, index_path: Path, *, start: int = 0) -> None:
        self.index_path = index_path
        self.start = start  # the generation the index file starts from: the next file is at least this
        self.records = self.bytes = 0  # appended since the last rotation
        self._fd: int | None = None
        self._generation: int | None = None
        self._appended = self._durable = 0  # bytes appended by this object / known to be on disk
        self._sync_lock = asyncio.Lock()

    def append(self, record: bytes) -> None:
        """Append one record (not yet durable: see `sync`)."""
        if self._fd is None:
            self._open_next()
        view = memoryview(record)
        while view:
            view = view[os.write(self._fd, view):]
        self._appended += len(record)
        self.records += 1
        self.bytes += len(record)

    def _open_next(self) -> None:
        existing = [generation for generation, _ in log_files(self.index_path)]
        self._generation = max([self.start, *(g + 1 for g in existing)])
        path = self.index_path.with_name(f"{self.index_path.name}.{self._generation:08d}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        os.write(self._fd, MAGIC)
        os.fsync(self._fd)
        folder = os.open(path.parent, os.O_RDONLY)  # the new name survives a power cut too
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    async def sync(self) -> None:
        """Return once every record appended before the call is on disk."""
        target = self._appended
        async with self._sync_lock:
            if self._durable >= target:
                return
            position = self._appended
            await asyncio.to_thread(os.fsync, self._fd)
            self._durable = max(self._durable, position)

    async def rotate(self) -> int:
        """Close the open file (synced) and return the generation the next records go to: what a fold's index file
        records as `log_from`, the files before it being folded."""
        async with self._sync_lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                await asyncio.to_thread(os.fsync, fd)
                os.close(fd)
                self._durable = self._appended
                self.start = self._generation + 1
            else:
                self.start = max([self.start, *(g + 1 for g, _ in log_files(self.index_path))])
            self.records = self.bytes = 0
            return self.start

    def discard_before(self, generation: int) -> None:
        """Delete the log files older than `generation` (the index file holds their writes)."""
        for older, path in log_files(self.index_path):
            if older < generation:
                path.unlink(missing_ok=True)

    async def close(self) -> None:
        await self.rotate()
