"""The FAISS store on disk: one `.npz` file of columns, saved atomically (`save_index`) and read back (`load_index`),
and the writer's lock file beside it (`WriterLock`). The writes since the file was saved are in the log beside it
(log.py); the file records the first log generation it does not hold (`log_from`).

`save_index` writes a temporary file, syncs it and renames it over the index, so a crash during a save leaves the
previous index intact. A file whose document schema is not this code's is refused, never read half-filled.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from services.common.documents import DOCUMENT_SCHEMA, StoredImage
from services.common.errors import IndexNotReadyError, StoreMismatchError, StoreUnavailableError
from services.common.files import write_atomically
from services.common.stores.faiss.table import Columns, DocumentTable

logger = logging.getLogger(__name__)

# The persisted columns, one array each; a null label is "" in `labels` and False in `labelled`.
_TEXT_COLUMNS = ("id", "filename", "path", "source", "predicted_label")


@dataclasses.dataclass(frozen=True)
class GraphRecord:
    """What the index file records of the HNSW graph kept beside it: the token naming its file, the ids of its
    rows, and the ids changed since it was built (searched exactly beside it)."""

    token: str
    ids: tuple[str, ...]
    changed: frozenset[str]


@dataclasses.dataclass(frozen=True)
class SavedIndex:
    """An index file as read: its documents, the model version that wrote them (None when it holds none) and the
    graph it names, if any."""

    table: DocumentTable
    model_version: str | None
    graph: GraphRecord | None
    log_from: int = 0  # the first log generation the file does not hold: those are replayed

    @property
    def dims(self) -> int | None:
        """The size of its vectors; None when it holds no document."""
        return self.table.dims if len(self.table) else None


def save_index(path: Path, table: DocumentTable | Columns, *, model_version: str | None, graph: GraphRecord | None,
               log_from: int = 0) -> None:
    """Write `table` (and the record of `graph`) to `path`, whole or not at all (`write_atomically`); `log_from`: the
    first log generation whose writes it does not hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _columns(table.docs)
    if graph is not None:  # the graph kept beside the index, and what changed since it was built
        arrays |= {"graph_token": np.asarray(graph.token), "graph_ids": np.asarray(graph.ids, dtype=str),
                   "graph_changed": np.asarray(sorted(graph.changed), dtype=str)}
    write_atomically(path, lambda file: np.savez(file, vectors=table.vectors,
                                                 model_version=np.asarray(model_version or ""),
                                                 schema=np.asarray(DOCUMENT_SCHEMA),
                                                 log_from=np.asarray(log_from, dtype=np.int64), **arrays))
    logger.debug("saved %d documents to %s", len(table.docs), path)


def _columns(docs: list[StoredImage]) -> dict[str, np.ndarray]:
    columns = {f"{name}s": np.asarray([getattr(doc, name) for doc in docs], dtype=str) for name in _TEXT_COLUMNS}
    return columns | {
        "labels": np.asarray([doc.label or "" for doc in docs], dtype=str),
        "labelled": np.asarray([doc.label is not None for doc in docs], dtype=bool),
        "confidences": np.asarray([doc.confidence for doc in docs], dtype=np.float64),
        "sizes": np.asarray([doc.size for doc in docs], dtype=np.int64),
        "mtimes": np.asarray([doc.mtime for doc in docs], dtype=np.float64),
    }


def load_index(path: Path) -> SavedIndex:
    """The index at `path`. Raises `IndexNotReadyError` when it cannot be read, `StoreMismatchError` when its
    documents are of another schema than `DOCUMENT_SCHEMA` (it is rebuilt, not read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            schema = int(data["schema"]) if "schema" in data else 1  # recorded from schema 2 on
            saved = _read(data) if schema == DOCUMENT_SCHEMA else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise IndexNotReadyError(f"the index at {path} is unreadable ({exc}); delete it and run `cbir index`") from exc
    if saved is None:
        raise StoreMismatchError(f"the index at {path} holds documents of schema {schema}, not {DOCUMENT_SCHEMA}; "
                                 "re-index (cbir index --rebuild)")
    return saved


def _read(data: np.lib.npyio.NpzFile) -> SavedIndex:
    vectors = data["vectors"].astype(np.float32)
    model_version = str(data["model_version"]) or None
    docs = _documents_from(data, model_version or "")
    graph = GraphRecord(str(data["graph_token"]), tuple(data["graph_ids"].tolist()),
                        frozenset(data["graph_changed"].tolist())) if "graph_token" in data else None
    log_from = int(data["log_from"]) if "log_from" in data else 0  # recorded since the write log
    return SavedIndex(table=DocumentTable(docs, vectors), model_version=model_version if docs else None, graph=graph,
                      log_from=log_from)


def _documents_from(data: np.lib.npyio.NpzFile, model_version: str) -> list[StoredImage]:
    columns = {name: data[f"{name}s"].tolist() for name in _TEXT_COLUMNS}
    labels, labelled = data["labels"].tolist(), data["labelled"].tolist()
    confidences, sizes, mtimes = data["confidences"].tolist(), data["sizes"].tolist(), data["mtimes"].tolist()
    return [
        StoredImage(id=columns["id"][row], filename=columns["filename"][row], path=columns["path"][row],
                    source=columns["source"][row], label=labels[row] if labelled[row] else None,
                    predicted_label=columns["predicted_label"][row], confidence=confidences[row],
                    size=sizes[row], mtime=mtimes[row], model_version=model_version)
        for row in range(len(labels))
    ]


class WriterLock:
    """An exclusive `flock` on `<index>.lock` beside the index, taken before the first write and held until
    `release` (or until the lock is dropped or the process ends), so that two writers (say, `cbir index` while
    `cbir serve` is indexing the same state directory) cannot overwrite each other's work. Readers take none.

    >>> lock = WriterLock(Path("state/index.npz"))
    >>> lock.acquire()  # StoreUnavailableError while another process holds it
    """

    def __init__(self, index_path: Path) -> None:
        self.index_path = index_path
        self.path = index_path.with_name(index_path.name + ".lock")
        self._fd: int | None = None  # the descriptor holding the flock, while held

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock unless this object holds it already, then remove what a killed save left behind (only
        the holder may: another writer's save could be under way). The file records the holder's pid."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            # Busy, not broken: once the other writer closes, the same call succeeds.
            raise StoreUnavailableError(f"another process (pid {holder}) is writing the index at {self.index_path}; "
                                        "wait for it to finish or use another CBIR_STATE_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        for leftover in self.index_path.parent.glob(self.index_path.name + ".*.tmp"):  # from a save that was killed
            leftover.unlink(missing_ok=True)

    def release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:  # a dropped lock lets go, as an ended process does
        self.release()
