"""The gateway as a service for one's own collection, on both stores (FAISS, and Elasticsearch through the
HTTP double): add an image (same bytes, same id), search by an indexed image, delete it, filter, page,
batch, "more like these", the collection's counts, who may write, and the uploads' quota."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from factories import copy_collection
from PIL import Image
from servers import asgi_client

from services import wiring
from services.common.images import reencode_image
from services.common.stores.base import VectorStore
from services.common.stores.faiss import FaissStore
from services.indexer.pipeline import IndexOptions, index_collection
from services.search.app import create_app
from services.search.settings import SearchSettings

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio
PER_CLASS = 6  # 60 indexed images
OPTIONS = IndexOptions(batch_size=64, concurrency=1, rebuild=False, progress_bar=False)


@dataclass
class Gallery:
    client: httpx.AsyncClient
    settings: SearchSettings
    root: Path
    store: VectorStore

    def image(self, label: str = "cat", index: int = 0) -> bytes:
        return sorted((self.root / "train" / label).iterdir())[index].read_bytes()

    async def add(self, data: bytes, **form: str) -> httpx.Response:
        return await self.client.post("/images", files={"file": ("mine.jpg", data, "image/jpeg")}, data=form)

    async def search(self, data: bytes, **params: object) -> httpx.Response:
        return await self.client.post("/search", params=params, files={"file": ("q.jpg", data, "image/jpeg")})


async def open_gallery(backend: str, tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path,
                       make_es_store: MakeEsStore, *, base_url: str = "http://127.0.0.1",
                       **overrides: object) -> AsyncIterator[Gallery]:
    root = copy_collection(mini_collection, tmp_path / "collection", train=PER_CLASS, test=1)
    settings = SearchSettings(_env_file=None, state_dir=tmp_path / "state", model_dir=tiny_bundle_dir,
                              data_dir=root, backend=backend, compile="off", **overrides)  # type: ignore[call-arg]
    embedder = wiring.build_local_embedding_service(settings)
    store: VectorStore = FaissStore(settings.faiss_path) if backend == "faiss" else make_es_store()
    await index_collection(root, "train", embedder, store, OPTIONS)
    app = create_app(settings, embedder_factory=lambda: embedder, store_factory=lambda: store)
    async with asgi_client(app, base_url=base_url) as client:
        yield Gallery(client, settings, root, store)


@pytest.fixture(params=["faiss", "elasticsearch"])
async def gallery(request: pytest.FixtureRequest, tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path,
                  make_es_store: MakeEsStore) -> AsyncIterator[Gallery]:
    async for opened in open_gallery(request.param, tmp_path, tiny_bundle_dir, mini_collection, make_es_store):
        yield opened


def jpeg_with_gps(data: bytes) -> bytes:
    """The image re-saved with EXIF holding a camera model and a GPS position."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64))
    exif = Image.Exif()
    exif[0x0110] = "SecretCam 3000"  # Model
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}  # GPSInfo
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=90)
    return buffer.getvalue()


async def test_an_added_image_is_searchable_found_by_id_and_gone_once_deleted(gallery: Gallery) -> None:
    data = jpeg_with_gps(gallery.image("ship"))
    added = await gallery.add(data, label="ship")
    assert added.status_code == 201, added.text
    body = added.json()
    image_id = body["id"]
    assert body["filename"] == f"{image_id}.jpg" and body["label"] == "ship"
    assert set(body) == {"id", "filename", "label", "predicted_label", "model_version", "near_duplicate_of"}
    assert body["near_duplicate_of"] is None  # the collection's signatures were never computed
    stored = gallery.settings.uploads_dir / body["filename"]
    assert stored.is_file() and b"SecretCam" not in stored.read_bytes()
    assert not Image.open(stored).getexif()  # no EXIF, so no GPS, kept
    again = await gallery.add(data, label="something else")
    assert again.status_code == 200 and again.json() == body  # the same bytes: the same document, unchanged
    assert sorted(p.name for p in gallery.settings.uploads_dir.iterdir()) == [body["filename"]]

    served = await gallery.client.get(f"/images/{image_id}")
    assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in served.headers["content-security-policy"]
    meta = (await gallery.client.get(f"/images/{image_id}/meta")).json()
    assert meta["source"] == "upload" and meta["label"] == "ship" and meta["size"] == stored.stat().st_size
    assert meta["predicted_label"] == body["predicted_label"] and "vector" not in meta

    found = (await gallery.search(data, k=3)).json()
    assert found["hits"][0]["id"] == image_id and found["hits"][0]["score"] == pytest.approx(2.0, abs=1e-3)
    similar = await gallery.client.get(f"/images/{image_id}/similar", params={"k": 5})
    assert similar.status_code == 200
    assert image_id not in [hit["id"] for hit in similar.json()["hits"]] and len(similar.json()["hits"]) == 5
    assert similar.json()["query"] == {"predicted_label": meta["predicted_label"], "confidence": meta["confidence"]}

    assert (await gallery.client.delete(f"/images/{image_id}")).status_code == 204
    for path in (f"/images/{image_id}", f"/images/{image_id}/meta", f"/images/{image_id}/similar"):
        assert (await gallery.client.get(path)).status_code == 404, path
    assert not stored.exists()
    assert image_id not in [hit["id"] for hit in (await gallery.search(data, k=60)).json()["hits"]]
    assert (await gallery.client.delete(f"/images/{image_id}")).status_code == 404


async def test_similar_on_a_collection_image_excludes_it_and_reports_its_stored_prediction(gallery: Gallery) -> None:
    [hit] = (await gallery.search(gallery.image("dog", 2), k=1)).json()["hits"]
    meta = (await gallery.client.get(f"/images/{hit['id']}/meta")).json()
    assert meta["source"] == str(gallery.root.resolve()) and meta["label"] == "dog"
    similar = (await gallery.client.get(f"/images/{hit['id']}/similar", params={"k": 59})).json()
    assert hit["id"] not in {h["id"] for h in similar["hits"]} and len(similar["hits"]) == 59
    assert similar["query"]["predicted_label"] == meta["predicted_label"]
    assert (await gallery.client.get("/images/nope/similar")).status_code == 404


async def test_filters_and_pages(gallery: Gallery) -> None:
    query = gallery.image("cat", 1)
    first = (await gallery.search(query, k=20)).json()["hits"]
    second = (await gallery.search(query, k=10, offset=10)).json()["hits"]
    assert [h["id"] for h in second] == [h["id"] for h in first[10:20]]
    cats_dogs = (await gallery.client.post("/search", params=[("k", "60"), ("label", "cat"), ("label", "dog")],
                                           files={"file": ("q.jpg", query, "image/jpeg")})).json()["hits"]
    assert len(cats_dogs) == 2 * PER_CLASS and {h["label"] for h in cats_dogs} == {"cat", "dog"}
    answer = (await gallery.search(query, k=60, same_class="true")).json()
    predicted = answer["query"]["predicted_label"]
    assert answer["hits"] and {h["predicted_label"] for h in answer["hits"]} == {predicted}
    everything = (await gallery.search(query, k=60)).json()["hits"]
    assert len(answer["hits"]) == sum(h["predicted_label"] == predicted for h in everything)
    too_deep = await gallery.search(query, k=10, offset=9995)
    assert too_deep.status_code == 422 and "offset + k must be at most 10000" in too_deep.json()["detail"]


async def test_a_batch_answers_each_file_in_order_and_one_bad_file_fails_alone(gallery: Gallery) -> None:
    files = [("files", ("a.jpg", gallery.image("cat"), "image/jpeg")),
             ("files", ("broken.jpg", b"not an image", "image/jpeg")),
             ("files", ("c.jpg", gallery.image("ship"), "image/jpeg"))]
    response = await gallery.client.post("/search/batch", params={"k": 4}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    assert results[1]["error"]["status"] == 415 and "broken.jpg" in results[1]["error"]["detail"]
    for single, data in ((results[0], gallery.image("cat")), (results[2], gallery.image("ship"))):
        alone = (await gallery.search(data, k=4)).json()
        assert [h["id"] for h in single["hits"]] == [h["id"] for h in alone["hits"]]
        assert single["query"] == alone["query"]
    many = [("files", (f"{i}.jpg", gallery.image("cat"), "image/jpeg")) for i in range(33)]
    refused = await gallery.client.post("/search/batch", files=many)
    assert refused.status_code == 422 and "at most 32 files" in refused.json()["detail"]


async def test_more_like_these_less_like_those(gallery: Gallery) -> None:
    cats = [(await gallery.search(gallery.image("cat", i), k=1)).json()["hits"][0]["id"] for i in (0, 1)]
    dog = (await gallery.search(gallery.image("dog", 0), k=1)).json()["hits"][0]["id"]
    response = await gallery.client.post("/search/examples", params={"k": 10},
                                         json={"positive": cats, "negative": [dog], "beta": 0.5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] is None and len(body["hits"]) == 10
    assert not {h["id"] for h in body["hits"]} & {*cats, dog}
    unknown = await gallery.client.post("/search/examples", json={"positive": [cats[0], "nope"]})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    cancelled = await gallery.client.post("/search/examples", json={"positive": [dog], "negative": [dog], "beta": 1})
    assert cancelled.status_code == 422 and "cancel out" in cancelled.json()["detail"]
    for bad in ({"positive": []}, {"positive": cats, "beta": 1.5}, {"positive": ["x"] * 101}):
        assert (await gallery.client.post("/search/examples", json=bad)).status_code == 422, bad
    same_class = await gallery.client.post("/search/examples", params={"same_class": "true"}, json={"positive": cats})
    assert same_class.status_code == 422 and "label=" in same_class.json()["detail"]


async def test_the_collection_counts_sources_and_labels(gallery: Gallery) -> None:
    await gallery.add(gallery.image("cat", 3)[:-1] + b"\xd9")  # other bytes, decodable: an unlabelled upload
    body = (await gallery.client.get("/collection")).json()
    assert body["status"] == "ready" and body["documents"] == 61 and body["backend"] == gallery.store.name
    assert body["sources"] == {str(gallery.root.resolve()): 60, "upload": 1}
    assert body["labels"] == dict.fromkeys(sorted(p.name for p in (gallery.root / "train").iterdir()), PER_CLASS)
    assert body["unlabelled"] == 1 and body["writes"] is True and body["model_version"]


async def test_concurrent_uploads_of_the_same_bytes_store_one_document(gallery: Gallery) -> None:
    data = gallery.image("frog", 1)
    answers = await asyncio.gather(*(gallery.add(data) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert (await gallery.client.get("/collection")).json()["sources"]["upload"] == 1


async def test_bad_uploads_store_nothing(gallery: Gallery) -> None:
    for data, status in ((b"", 400), (b"not an image", 415), (b"\xff" * (11 * 2**20), 413)):
        response = await gallery.add(data)
        assert response.status_code == status and response.json()["detail"]
    assert (await gallery.client.get("/collection")).json()["documents"] == 60
    assert not gallery.settings.uploads_dir.exists() or not any(gallery.settings.uploads_dir.iterdir())


async def test_the_stage_latencies_are_exported(gallery: Gallery) -> None:
    await gallery.search(gallery.image(), k=2)
    metrics = (await gallery.client.get("/metrics/")).text
    for stage in ("decode", "embed", "search"):
        assert re.search(rf'cbir_stage_seconds_count\{{stage="{stage}"\}} [1-9]', metrics), stage
    assert re.search(r"cbir_documents [1-9]", metrics)
    assert re.search(r'cbir_model_version_info\{model_version="[^"]+"\} 1\.0', metrics)


# -- who may write ------------------------------------------------------------------------------


@pytest.mark.parametrize(("base_url", "overrides", "status", "detail"), [
    ("http://search.example", {}, 403, "CBIR_WRITE_API_KEYS"),  # not a loopback listener
    ("http://127.0.0.1", {"environment": "production"}, 403, "CBIR_WRITE_API_KEYS"),
    ("http://127.0.0.1", {"write_api_keys": ["k-123"]}, 401, "X-API-Key"),  # keys set: loopback is not enough
], ids=["not-loopback", "production", "keys-set"])
async def test_writes_without_a_key_are_refused_outside_local_development(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path, make_es_store: MakeEsStore, base_url: str,
        overrides: dict, status: int, detail: str) -> None:
    async for opened in open_gallery("faiss", tmp_path, tiny_bundle_dir, mini_collection, make_es_store,
                                     base_url=base_url, **overrides):
        refused = await opened.add(opened.image())
        assert refused.status_code == status and detail in refused.json()["detail"]
        [hit] = (await opened.search(opened.image(), k=1)).json()["hits"]
        assert (await opened.client.delete(f"/images/{hit['id']}")).status_code == status
        assert (await opened.client.get("/collection")).json()["documents"] == 60  # nothing changed
        if "write_api_keys" in overrides:
            allowed = await opened.client.post("/images", headers={"X-API-Key": "k-123"},
                                               files={"file": ("a.jpg", opened.image(), "image/jpeg")})
            assert allowed.status_code == 201


async def test_a_cross_site_write_is_refused_and_a_listed_origin_allowed(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path, make_es_store: MakeEsStore) -> None:
    async for opened in open_gallery("faiss", tmp_path, tiny_bundle_dir, mini_collection, make_es_store,
                                     cors_origins=["https://photos.example"]):
        files = {"file": ("a.jpg", opened.image(), "image/jpeg")}
        evil = await opened.client.post("/images", headers={"Origin": "https://evil.example"}, files=files)
        assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
        own = await opened.client.post("/images", headers={"Origin": "http://127.0.0.1"}, files=files)
        assert own.status_code == 201
        listed = await opened.client.delete(f"/images/{own.json()['id']}", headers={"Origin": "https://photos.example"})
        assert listed.status_code == 204


async def test_an_upload_past_the_quota_is_507_and_stores_nothing(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path, make_es_store: MakeEsStore) -> None:
    cat, dog = (sorted((mini_collection / "train" / label).iterdir())[0].read_bytes() for label in ("cat", "dog"))
    quota = len(reencode_image(cat)[0]) + len(reencode_image(dog)[0]) - 1  # room for the cat, not for both
    async for opened in open_gallery("faiss", tmp_path, tiny_bundle_dir, mini_collection, make_es_store,
                                     max_upload_storage_bytes=quota):
        first = await opened.add(cat)
        assert first.status_code == 201
        full = await opened.add(dog)
        assert full.status_code == 507 and "CBIR_MAX_UPLOAD_STORAGE_BYTES" in full.json()["detail"]
        assert (await opened.client.get("/collection")).json()["sources"]["upload"] == 1
        assert len(list(opened.settings.uploads_dir.iterdir())) == 1
