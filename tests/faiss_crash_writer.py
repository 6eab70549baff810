"""A FAISS store writer to be killed (tests/common/stores/faiss/test_crash.py): adds and removes documents through
`FaissStore`, four at a time, printing `begin <op> <id>` before each write and `ack <op> <id>` once it returned.

    python tests/faiss_crash_writer.py STATE_DIR PREFIX COUNT SEED [KILL_POINT]

KILL_POINT (`append:N`, `fsync:N`, `before-rename:N`, `after-rename:N`, `discard:N`) makes the process SIGKILL
itself at the N-th such call: `append` half-way through a write to the log, `fsync` before a log fsync,
`before-rename`/`after-rename` around a fold's rename of the index file, `discard` before a fold removes the log
files it holds. The points are patched in here, the test's harness; the product has no such hook.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import zlib
from pathlib import Path

import numpy as np

from services.common.documents import ImageDocument
from services.common.stores.faiss import FaissStore
from services.common.stores.faiss import log as faiss_log

DIMS, MODEL_VERSION, FOLD_RECORDS = 12, "v-crash", 9


def vector_of(doc_id: str) -> np.ndarray:
    """The vector a document of this id is written with (the test checks it after a crash)."""
    vector = np.random.default_rng(zlib.crc32(doc_id.encode())).normal(size=DIMS).astype(np.float32)
    return vector / np.linalg.norm(vector)


def document(doc_id: str) -> ImageDocument:
    return ImageDocument(id=doc_id, filename=f"{doc_id}.jpg", path=f"up/{doc_id}.jpg", source="/uploads", label=None,
                         predicted_label="cat", confidence=0.5, size=1, mtime=1.5, model_version=MODEL_VERSION,
                         vector=vector_of(doc_id))


def open_store(state: Path) -> FaissStore:
    return FaissStore(state / "index.npz", fold_records=FOLD_RECORDS)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, nth: int) -> None:
    """Patch the call `point` names so that its `nth` call kills this process."""
    calls = 0

    def due() -> bool:
        nonlocal calls
        calls += 1
        return calls == nth

    write, fsync, replace = os.write, os.fsync, os.replace
    if point == "append":
        def torn_write(fd: int, data: bytes) -> int:
            if due():
                write(fd, bytes(data)[:max(1, len(data) // 2)])
                _die()
            return write(fd, data)
        faiss_log.os = _Patched(write=torn_write)
    elif point == "fsync":
        def dying_fsync(fd: int) -> None:
            if due():
                _die()
            fsync(fd)
        faiss_log.os = _Patched(fsync=dying_fsync)
    elif point in ("before-rename", "after-rename"):
        def dying_replace(source: str, target: str) -> None:
            if point == "before-rename" and due():
                _die()
            replace(source, target)
            if point == "after-rename" and due():
                _die()
        from services.common import files
        files.os = _Patched(replace=dying_replace)
    elif point == "discard":
        discard = faiss_log.WriteLog.discard_before

        def dying_discard(self: faiss_log.WriteLog, generation: int) -> None:
            if due():
                _die()
            discard(self, generation)
        faiss_log.WriteLog.discard_before = dying_discard
    else:
        raise SystemExit(f"unknown kill point {point}")


class _Patched:
    """The `os` module with some functions replaced (for one module's globals only)."""

    def __init__(self, **replaced: object) -> None:
        self._replaced = replaced

    def __getattr__(self, name: str) -> object:
        return self._replaced.get(name) or getattr(os, name)


async def run(state: Path, prefix: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    store = open_store(state)
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    held = [doc.id async for doc in store.iter_documents()]
    print("opened", flush=True)

    async def write(op: str, doc_id: str) -> None:
        print("begin", op, doc_id, flush=True)
        await (store.add(document(doc_id)) if op == "add" else store.remove(doc_id))
        print("ack", op, doc_id, flush=True)

    for start in range(0, count, 4):  # four writes at once, none of them on a document another one writes
        ops = []
        for i in range(start, min(start + 4, count)):
            if held and rng.random() < 0.3:
                ops.append(("remove", held.pop(rng.randrange(len(held)))))
            else:
                ops.append(("add", f"{prefix}-{i:05d}"))
        await asyncio.gather(*(write(op, doc_id) for op, doc_id in ops))
        held += [doc_id for op, doc_id in ops if op == "add"]
    await store.close()
    print("closed", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 5:
        point, nth = sys.argv[5].split(":")
        arm(point, int(nth))
    asyncio.run(run(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
