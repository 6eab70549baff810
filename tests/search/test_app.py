"""The search gateway through HTTP, with its lifespan running: ranked hits, errors, health, docs, metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from factories import make_document
from fakes import ControlledEmbedder, MemoryStore
from servers import asgi_client

from services.common.stores.base import MAX_RESULT_WINDOW

pytestmark = pytest.mark.anyio


async def test_search_returns_ranked_hits(search_client: httpx.AsyncClient, test_image: bytes) -> None:
    response = await search_client.post("/search", params={"k": 7}, files={"file": ("q.jpg", test_image, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"query", "hits", "model_version", "took_ms"}
    assert body["query"]["predicted_label"] in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                "horse", "ship", "truck"}
    assert 0.0 <= body["query"]["confidence"] <= 1.0
    hits = body["hits"]
    assert len(hits) == 7
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= score <= 2.0 for score in scores)
    assert len({hit["id"] for hit in hits}) == 7
    image = await search_client.get(hits[0]["image_url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"


async def test_search_rejects_bad_upload_with_json(search_client: httpx.AsyncClient) -> None:
    response = await search_client.post("/search", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
    assert response.status_code == 415
    assert "not a supported image" in response.json()["detail"]


async def test_healthz_and_docs(search_client: httpx.AsyncClient) -> None:
    health = await search_client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["documents"] == 500
    assert (await search_client.get("/docs")).status_code == 200
    schema = (await search_client.get("/openapi.json")).json()
    assert "/search" in schema["paths"]
    page = await search_client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert f"const MAX_RESULT_WINDOW = {MAX_RESULT_WINDOW};" in page.text  # the page pages as far as the API
    assert "{{" not in page.text  # every placeholder filled in
    assert health.json()["warm_up"] is None  # the tests' model is not compiled (CBIR_COMPILE=off)


async def test_healthz_says_how_far_the_models_compilation_is(tmp_path: Path) -> None:
    from services.search.app import create_app
    from services.search.settings import SearchSettings

    embedder = ControlledEmbedder(dims=4, model_version="v1")
    embedder.warming_up, embedder.warm_up_progress = True, (1, 4)
    store = MemoryStore([make_document(f"d{i}", np.eye(4, dtype=np.float32)[i], model_version="v1")
                         for i in range(4)])
    settings = SearchSettings(_env_file=None, state_dir=tmp_path / "state")  # type: ignore[call-arg]
    async with asgi_client(create_app(settings, embedder_factory=lambda: embedder, store_factory=lambda: store),
                           base_url="http://search") as client:
        warming = (await client.get("/healthz")).json()
        embedder.warming_up, embedder.warm_up_progress = False, (4, 4)
        ready = (await client.get("/healthz")).json()
    assert (warming["status"], warming["warm_up"]) == ("warming_up", {"compiled": 1, "total": 4})
    assert (ready["status"], ready["warm_up"]) == ("ready", {"compiled": 4, "total": 4})


def metric(text: str, sample: str) -> float:
    """The value of one sample line of a Prometheus text page (0 when absent)."""
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_requests_per_route_template(search_client: httpx.AsyncClient, test_image: bytes) -> None:
    # The registry is process-wide: compare before and after this test's own requests.
    searches = 'cbir_http_requests_total{method="POST",route="/search",service="search",status="200"}'
    not_found = 'cbir_http_requests_total{method="GET",route="/images/{id}",service="search",status="404"}'
    before = (await search_client.get("/metrics", follow_redirects=True)).text
    for _ in range(2):
        await search_client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
    await search_client.get("/images/0123456789abcdef0123")
    response = await search_client.get("/metrics", follow_redirects=True)
    assert response.status_code == 200
    text = response.text
    assert metric(text, searches) - metric(before, searches) == 2
    assert metric(text, not_found) - metric(before, not_found) == 1  # counted under the route template
    forward_passes = "cbir_embedder_batch_images_count"
    assert metric(text, forward_passes) - metric(before, forward_passes) >= 1
    assert not re.search(r'route="/images/[0-9a-f]+"', text)  # ids never become label values


async def test_every_operation_documents_its_answers_errors_and_examples(search_client: httpx.AsyncClient) -> None:
    """OpenAPI: every operation has a description, a success answer with an example (JSON) or a content type,
    and its error models; the README's API table and docs/api.md list every one of them."""
    from services.common.collection import REPO_ROOT

    schema = (await search_client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    readme, api_doc = (REPO_ROOT / "README.md").read_text(), (REPO_ROOT / "docs" / "api.md").read_text()
    operations = [(path, method, spec) for path, methods in schema["paths"].items() for method, spec in methods.items()]
    assert len(operations) >= 10
    for path, method, spec in operations:
        where = f"{method.upper()} {path}"
        assert spec.get("description"), where
        assert f"`{method.upper()} {path}`" in readme, f"README's API table lacks {where}"
        assert f"`{method.upper()} {path}`" in api_doc, f"docs/api.md lacks {where}"
        success = {code: answer for code, answer in spec["responses"].items() if code.startswith("2")}
        assert success, where
        for code, answer in success.items():
            content = answer.get("content", {})
            if "application/json" in content and code != "204":
                ref = content["application/json"]["schema"].get("$ref", "")
                assert components[ref.rsplit("/", 1)[-1]].get("examples"), f"{where} {code}: no example"
        errors = [code for code in spec["responses"] if code[0] in "45"]
        assert "422" in errors or not spec.get("parameters"), where
        for code in errors:
            assert "$ref" in spec["responses"][code]["content"]["application/json"]["schema"], f"{where} {code}"


async def test_every_search_gives_hits_a_similarity_that_tells_same_class_hits_apart(
        search_client: httpx.AsyncClient, test_image: bytes) -> None:
    upload = {"file": ("q.jpg", test_image, "image/jpeg")}
    body = (await search_client.post("/search", params={"k": 30, "same_class": "true"}, files=upload)).json()
    similarities = [hit["similarity"] for hit in body["hits"]]
    assert all(-1.0 <= s <= 1.0 for s in similarities)
    assert len(set(similarities)) == len(similarities)  # same class, all told apart (the scores crowd near 2.0)
    first = body["hits"][0]["id"]
    answers = [
        (await search_client.get(f"/images/{first}/similar", params={"k": 3})).json(),
        (await search_client.post("/search/examples", params={"k": 3}, json={"positive": [first]})).json(),
        (await search_client.post("/search/batch", params={"k": 3}, files=[("files", upload["file"])])).json()[
            "results"][0],
    ]
    for answer in answers:
        assert len(answer["hits"]) == 3
        assert all(isinstance(hit["similarity"], float) and -1 <= hit["similarity"] <= 1 for hit in answer["hits"])
    assert answers[0]["hits"][0]["similarity"] == pytest.approx(answers[1]["hits"][0]["similarity"], abs=1e-5)


async def test_a_box_searches_by_that_region_of_the_upload(search_client: httpx.AsyncClient, test_image: bytes) -> None:
    upload = {"file": ("q.jpg", test_image, "image/jpeg")}
    whole = (await search_client.post("/search", params={"k": 5}, files=upload)).json()
    boxed_whole = (await search_client.post("/search", params={"k": 5, "box": "0,0,32,32"}, files=upload)).json()
    assert [(h["id"], h["score"]) for h in boxed_whole["hits"]] == [(h["id"], h["score"]) for h in whole["hits"]]
    corner = await search_client.post("/search", params={"k": 5, "box": " 2, 3,12,10"}, files=upload)
    assert corner.status_code == 200, corner.text
    assert len(corner.json()["hits"]) == 5
    assert [h["score"] for h in corner.json()["hits"]] != [h["score"] for h in whole["hits"]]  # another query


@pytest.mark.parametrize(("box", "message"), [
    ("0,0,0,10", "is empty"), ("-1,0,10,10", "not inside the image, which is 32×32"),
    ("20,20,13,5", "not inside the image"), ("1,2,3", "four integers"), ("a,b,c,d", "four integers"),
])
async def test_a_box_empty_outside_or_malformed_is_a_422(search_client: httpx.AsyncClient, test_image: bytes,
                                                        box: str, message: str) -> None:
    response = await search_client.post("/search", params={"box": box},
                                        files={"file": ("q.jpg", test_image, "image/jpeg")})
    assert response.status_code == 422
    body = response.json()
    assert message in body["detail"]
    assert body["errors"][0]["loc"] == ["query", "box"]
