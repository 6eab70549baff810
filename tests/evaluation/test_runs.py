"""The search API client of `cbir evaluate --url`: busy answers retried, hit ids mapped, failures named."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.common.documents import document_id
from services.evaluation.runs import SearchApiError, document_rows, search_api


@pytest.mark.anyio
async def test_search_api_retries_busy_answers_and_maps_hit_ids(tmp_path: Path) -> None:
    query = tmp_path / "q.jpg"
    query.write_bytes(b"jpeg bytes")
    paths = ["train/cat/0.jpg", "train/dog/1.jpg"]
    root = "/data/cifar10"  # the collection root the server indexed
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "1"})
        hits = [{"id": document_id(root, paths[1]), "score": 1.9}, {"id": "not-in-the-collection", "score": 1.5}]
        return httpx.Response(200, json={"query": {"predicted_label": "dog", "confidence": 0.9}, "hits": hits})

    ranking = await search_api("http://search", [query], classes=["cat", "dog"], doc_rows=document_rows(root, paths),
                               k=3, transport=httpx.MockTransport(answer))
    assert len(calls) == 2 and calls[1].url.params["k"] == "3"
    assert ranking.hits.tolist() == [[1, -1, -1]] and ranking.unknown_hits == 1
    assert ranking.predicted.tolist() == [1]


@pytest.mark.anyio
async def test_search_api_names_the_query_it_could_not_search(tmp_path: Path) -> None:
    query = tmp_path / "broken.jpg"
    query.write_bytes(b"x")
    transport = httpx.MockTransport(lambda request: httpx.Response(415, json={"detail": "not an image"}))
    with pytest.raises(SearchApiError, match="broken.jpg.*HTTP 415"):
        await search_api("http://search", [query], classes=["cat"], doc_rows={}, k=5, transport=transport)
