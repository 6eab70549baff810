"""Rankings of the test queries, three ways, and the TREC files that record them.

    exact_search   FAISS exact inner product over locally built vectors (what FaissStore does)
    search_store   the indexed embedded store in CBIR_STATE_DIR (FaissStore.search)
    search_api     a running search gateway: POST /search?k=… with each test image's bytes
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import httpx
import numpy as np
from tqdm import tqdm

from services.common.documents import document_id
from services.common.errors import SearchApiError
from services.common.stores.faiss import FaissStore
from services.evaluation.metrics import run_entries

logger = logging.getLogger(__name__)


@dataclass
class Ranking:
    """The top k of every query: `hits` (Q, k) index the documents (-1: no hit, or one not in the
    collection), best first; `predicted` is each query's predicted class."""

    hits: np.ndarray
    predicted: np.ndarray
    unknown_hits: int = 0


def exact_search(query_vectors: np.ndarray, doc_vectors: np.ndarray, k: int) -> np.ndarray:
    """Top-k rows of `doc_vectors` by exact inner product (cosine: the vectors are unit length), as FaissStore."""
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(np.ascontiguousarray(doc_vectors, dtype=np.float32))
    _, hits = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), min(k, len(doc_vectors)))
    return np.pad(hits, ((0, 0), (0, max(0, k - hits.shape[1]))), constant_values=-1)


async def search_store(store_path: Path, query_vectors: np.ndarray, predicted: np.ndarray, *, dims: int,
                       model_version: str, doc_rows: dict[str, int], k: int, progress: bool = False) -> Ranking:
    """Each query vector (built locally from `predicted` classes) through `FaissStore.search` on the
    index the indexer wrote; `model_version` must be the one it was built with."""
    store = FaissStore(store_path)
    await store.open(dims=dims, model_version=model_version, create=False)
    hits = np.full((len(query_vectors), k), -1, dtype=np.int64)
    unknown = 0
    try:
        for i, vector in enumerate(tqdm(query_vectors, desc="store search", unit="q", disable=not progress)):
            found = await store.search(vector, k)
            rows = [doc_rows.get(hit.id, -1) for hit in found]
            unknown += rows.count(-1)
            hits[i, :len(rows)] = rows
    finally:
        await store.close()
    return Ranking(hits=hits, predicted=predicted, unknown_hits=unknown)


@dataclass(frozen=True)
class ApiOptions:
    """How to talk to the search API: timeouts on by default, bounded concurrency and retries."""

    concurrency: int = 8
    timeout_s: float = 30.0
    retries: int = 3
    api_key: str | None = None


async def search_api(url: str, query_files: Sequence[Path], *, classes: list[str], doc_rows: dict[str, int],
                     k: int, options: ApiOptions = ApiOptions(), transport: httpx.AsyncBaseTransport | None = None,
                     progress: bool = False) -> Ranking:
    """Upload each query image to `POST {url}/search?k=…` and map the hits' ids to documents.

    >>> ranking = await search_api("http://localhost:8000", files, classes=classes, doc_rows=rows, k=100)
    """
    headers = {"X-API-Key": options.api_key} if options.api_key else {}
    timeout = httpx.Timeout(options.timeout_s, connect=min(options.timeout_s, 10.0))
    hits = np.full((len(query_files), k), -1, dtype=np.int64)
    predicted = np.zeros(len(query_files), dtype=np.int64)
    slots = asyncio.Semaphore(options.concurrency)
    bar = tqdm(total=len(query_files), desc="API search", unit="q", disable=not progress)
    unknown = 0

    async def one(client: httpx.AsyncClient, i: int, path: Path) -> None:
        nonlocal unknown
        async with slots:
            body = await _post_search(client, path, k, options.retries)
        predicted[i] = classes.index(body["query"]["predicted_label"])
        rows = [doc_rows.get(hit["id"], -1) for hit in body["hits"][:k]]
        unknown += rows.count(-1)
        hits[i, :len(rows)] = rows
        bar.update()

    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, headers=headers,
                                 transport=transport) as client:
        try:
            async with asyncio.TaskGroup() as group:
                for i, path in enumerate(query_files):
                    group.create_task(one(client, i, path))
        except* Exception as failures:  # the first failure, as itself rather than in a group
            raise failures.exceptions[0] from None
        finally:
            bar.close()
    return Ranking(hits=hits, predicted=predicted, unknown_hits=unknown)


async def _post_search(client: httpx.AsyncClient, path: Path, k: int, retries: int) -> dict:
    """One search; transport errors and 429/5xx are retried with backoff, anything else fails at once."""
    files = {"file": (path.name, path.read_bytes(), "image/jpeg")}
    delay = 0.5
    for attempt in range(retries + 1):
        try:
            response = await client.post("/search", params={"k": k}, files=files)
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                return response.json()
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code != 429 and response.status_code < 500:
                break
        if attempt < retries:
            logger.warning("search for %s failed (%s); retry %d", path.name, problem, attempt + 1)
            await asyncio.sleep(delay)
            delay *= 2
    raise SearchApiError(f"the search API at {client.base_url} failed for {path}: {problem}")


def document_rows(source: str, paths: Sequence[str]) -> dict[str, int]:
    """Document id (as the store and the API return it for the collection indexed from `source`, its
    resolved root) → row of the document in `paths`."""
    return {document_id(source, path): row for row, path in enumerate(paths)}


def write_run(path: Path, query_ids: Sequence[str], hits: np.ndarray, doc_ids: Sequence[str], *, tag: str) -> None:
    """A TREC run file, `qid Q0 docno rank score tag`, holding exactly what `trec_eval` evaluated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for qid, row in zip(query_ids, hits, strict=True):
            for rank, (docno, score) in enumerate(run_entries(row, doc_ids).items(), start=1):
                file.write(f"{qid} Q0 {docno} {rank} {score:g} {tag}\n")


def write_labels(path: Path, splits: Sequence[tuple[Sequence[str], np.ndarray]], classes: list[str]) -> None:
    """The compact qrels: `id<TAB>class` for every query and document; relevant = same class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for ids, labels in splits:
            file.writelines(f"{name}\t{classes[label]}\n" for name, label in zip(ids, labels, strict=True))


def write_qrels(path: Path, query_ids: Sequence[str], query_labels: np.ndarray, doc_ids: Sequence[str],
                doc_labels: np.ndarray) -> None:
    """Full TREC qrels (`qid 0 docno 1`, every same-class document): 50M lines for CIFAR-10."""
    path.parent.mkdir(parents=True, exist_ok=True)
    by_class = {int(label): [doc_ids[i] for i in np.flatnonzero(doc_labels == label)]
                for label in np.unique(query_labels)}
    with path.open("w") as file:
        for qid, label in zip(query_ids, query_labels, strict=True):
            file.writelines(f"{qid} 0 {docno} 1\n" for docno in by_class[int(label)])


async def api_model_version(url: str, *, options: ApiOptions = ApiOptions(),
                            transport: httpx.AsyncBaseTransport | None = None) -> str:
    """The model version the search API serves (`GET /healthz`); fails fast when it is not ready."""
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=httpx.Timeout(options.timeout_s),
                                 transport=transport) as client:
        try:
            response = await client.get("/healthz")
        except httpx.TransportError as exc:
            raise SearchApiError(f"the search API at {url} is unreachable: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise SearchApiError(f"the search API at {url} is not ready: HTTP {response.status_code} {response.text[:200]}")
    return response.json()["model_version"]
