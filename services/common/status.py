"""The one status vocabulary of the API (`/healthz`, 503 bodies, the web page) and the progress of
an indexing run, which the indexer updates and the gateway reports."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    indexing = "indexing"  # an indexing run is filling the index; `indexed` of `total` so far
    ready = "ready"  # model and index agree; search answers
    warming_up = "warming_up"  # search answers (200), while the model is still being compiled: slower meanwhile
    empty = "empty"  # no index, or one without documents: run `cbir index`
    failed = "failed"  # not ready for another reason (indexing failed, embedder or store down); `detail` says why


@dataclass
class IndexProgress:
    """How far an indexing run is: `indexed` of the collection's `total` images are done (already in the
    store, embedded now, or skipped as undecodable); `total` is None while the collection is listed."""

    total: int | None = None
    indexed: int = 0

    def describe(self) -> str:
        if self.total is None:
            return "indexing: listing the collection"
        percent = 100 * self.indexed / self.total if self.total else 100.0
        return f"indexing the collection: {self.indexed} of {self.total} images ({percent:.0f}%)"
