"""Stand-ins for the parts a test does not exercise: embedding services without a model, and a store in memory.

    FixedEmbedder       every image gets the same unit vector
    ControlledEmbedder  a test steers it: holds `info()` at a gate, fails it on demand, picks each image's vector
    MemoryStore         a `VectorStore` in a dict, exact cosine search; holds searches at a gate, moves on demand
    settle()            lets every task that can run do so until it waits, with no wall-clock wait
    poll_until()        polls a condition (sync or async) until it holds, failing past a generous deadline
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import numpy as np

from services.common.documents import ImageDocument, StoredImage, StoreHit
from services.common.embedding import EmbedderInfo, Embedding
from services.common.errors import CbirError, IndexNotReadyError, StoreMismatchError
from services.common.images import IMAGE_SIZE, RESAMPLE
from services.common.scoring import score_from_cosine
from services.common.stores.base import CollectionStats, StoreInfo, StoreQuery, VectorStore, check_compatible


class FixedEmbedder:
    """An `EmbeddingService` without a model: every image gets the same unit vector."""

    warming_up = False
    warm_up_progress: tuple[int, int] | None = None

    def __init__(self, *, dims: int = 26, model_version: str = "fixed-model") -> None:
        self.dims, self.model_version = dims, model_version
        self.vector = np.eye(dims, dtype=np.float32)[0]

    async def info(self) -> EmbedderInfo:
        return EmbedderInfo(model_version=self.model_version, dims=self.dims, classes=["cat", "dog"], metadata={},
                            bundle_version="fixed", pca_dims=self.dims - 2, onehot_weight=2.0, device="cpu",
                            image_size=IMAGE_SIZE, resize=RESAMPLE)

    async def embed(self, images: np.ndarray, *, purpose: str = "query") -> list[Embedding]:
        return [Embedding(vector=self.vector, label="cat", confidence=1.0) for _ in images]

    async def close(self) -> None:
        pass


class ControlledEmbedder(FixedEmbedder):
    """An `EmbeddingService` a test steers. `info()` waits for `gate` (open at first) and raises `failure` when
    set; image i's vector is the unit vector along axis `image[0, 0, 0] % dims` (so a test picks the document
    a query finds), labelled `label`. It counts `info_calls`, records every `embedded` (count, purpose), and
    is `closed` after `close()`."""

    def __init__(self, *, dims: int = 16, model_version: str = "v1", label: str = "cat") -> None:
        super().__init__(dims=dims, model_version=model_version)
        self.label = label
        self.gate = asyncio.Event()
        self.gate.set()
        self.failure: CbirError | None = None
        self.info_calls = 0
        self.embedded: list[tuple[int, str]] = []
        self.closed = False

    async def info(self) -> EmbedderInfo:
        self.info_calls += 1
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return await super().info()

    async def embed(self, images: np.ndarray, *, purpose: str = "query") -> list[Embedding]:
        self.embedded.append((len(images), purpose))
        axes = np.eye(self.dims, dtype=np.float32)
        return [Embedding(vector=axes[int(image[0, 0, 0]) % self.dims], label=self.label, confidence=0.75)
                for image in images]

    async def close(self) -> None:
        self.closed = True


class MemoryStore(VectorStore):
    """A `VectorStore` in memory with exact cosine search (scores cosine + 1.0), for what sits above a store.

    Without `exists`, `open(create=False)` answers as for a missing index. Each `search_many` records its
    number of queries in `searches`, sets `searching` and waits for `search_gate` (open at first). With
    `moved_to` set, `verify` raises `StoreMismatchError` naming it (an alias moved to that model's index).
    """

    name = "memory"

    def __init__(self, documents: Iterable[ImageDocument] = (), *, exists: bool = True) -> None:
        self.documents: dict[str, ImageDocument] = {document.id: document for document in documents}
        first = next(iter(self.documents.values()), None)
        self.dims = None if first is None else len(first.vector)
        self.model_version = None if first is None else first.model_version
        self.exists = exists
        self.searches: list[int] = []
        self.searching = asyncio.Event()
        self.search_gate = asyncio.Event()
        self.search_gate.set()
        self.moved_to: str | None = None
        self.closed = False

    async def open(self, *, dims: int, model_version: str, create: bool = True) -> None:
        if not self.exists and not create:
            raise IndexNotReadyError("no index in memory; build one with `cbir index`")
        check_compatible(await self.info(), dims=dims, model_version=model_version, where="the memory store")
        self.exists, self.dims, self.model_version = True, dims, model_version

    async def info(self) -> StoreInfo:
        return StoreInfo(dims=self.dims, model_version=self.model_version, count=len(self.documents))

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        self.documents.update((document.id, document) for document in documents)

    async def add(self, document: ImageDocument) -> bool:
        if document.id in self.documents:
            return False
        self.documents[document.id] = document
        return True

    async def delete(self, ids: Sequence[str]) -> int:
        return sum([await self.remove(id) for id in ids])

    async def remove(self, id: str) -> bool:
        return self.documents.pop(id, None) is not None

    async def count(self) -> int:
        return len(self.documents)

    async def get(self, id: str) -> StoredImage | None:
        document = self.documents.get(id)
        return None if document is None else document.stored()

    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {id: self.documents[id].vector for id in ids if id in self.documents}

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return set(ids) & set(self.documents)

    async def iter_documents(self, *, source: str | None = None) -> AsyncIterator[StoredImage]:
        for id in sorted(self.documents):
            if source is None or self.documents[id].source == source:
                yield self.documents[id].stored()

    async def stats(self) -> CollectionStats:
        labels = Counter(document.label for document in self.documents.values())
        unlabelled = labels.pop(None, 0)
        return CollectionStats(documents=len(self.documents),
                               sources=dict(Counter(document.source for document in self.documents.values())),
                               labels=dict(sorted(labels.items())), unlabelled=unlabelled)

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        self.searches.append(len(queries))
        self.searching.set()
        await self.search_gate.wait()
        return [self._search(query) for query in queries]

    def _search(self, query: StoreQuery) -> list[StoreHit]:
        candidates = [document for document in self.documents.values()
                      if (query.labels is None or document.label in query.labels)
                      and (query.predicted_labels is None or document.predicted_label in query.predicted_labels)
                      and document.id not in query.exclude_ids]
        ranked = sorted(candidates, key=lambda document: -float(np.dot(document.vector, query.vector)))
        return [StoreHit(document.stored(), score_from_cosine(float(np.dot(document.vector, query.vector))))
                for document in ranked[query.offset:query.offset + query.k]]

    async def flush(self) -> None:
        pass

    async def reset(self) -> None:
        self.documents.clear()

    async def verify(self, model_version: str) -> None:
        if self.moved_to is not None:
            raise StoreMismatchError(f"the served index is now model {self.moved_to}'s, not {model_version}'s")

    async def close(self) -> None:
        self.closed = True


async def settle(turns: int = 10) -> None:
    """Let every task that can run do so until it waits: a few turns of the event loop, no wall-clock wait
    (a batcher that wrongly started another store call, say, would have started it by then)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def poll_until(condition: Callable[[], bool | Awaitable[bool]], *, within_s: float = 60.0, every_s: float = 0.05,
                     what: str = "the condition") -> float:
    """Poll `condition` until it holds; fail when it still does not after `within_s` (a deadline for a slow,
    busy machine, not a sleep). Returns the seconds it took."""
    started = time.monotonic()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic() - started
        assert time.monotonic() - started < within_s, f"{what} did not hold within {within_s} s"
        await asyncio.sleep(every_s)
