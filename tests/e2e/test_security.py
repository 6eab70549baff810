"""Security at the HTTP edge: no file outside the collection, API keys, closed CORS, no leaked secrets."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from factories import make_document
from fakes import FixedEmbedder
from sample_images import encode, sample_image
from servers import asgi_client

from services.common.settings import UploadSettings
from services.common.stores.faiss import FaissStore
from services.search.settings import SearchSettings

pytestmark = pytest.mark.anyio

SECRET = "TOP SECRET, never served"
UP_TO_ROOT = "../" * 30


# --- GET /images/{id} stays inside the collection ---------------------------------------------


@pytest.fixture
async def gallery(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A collection with one real image and traps around it, and an index pointing at all of them.

    Returns the state dir, the collection root and {document id: stored path}.
    """
    root, outside = tmp_path / "collection", tmp_path / "outside"
    (root / "train" / "cat").mkdir(parents=True)
    outside.mkdir()
    (root / "train" / "cat" / "ok.jpg").write_bytes(encode(sample_image(), "JPEG"))
    (tmp_path / "secret.txt").write_text(SECRET)
    (outside / "secret.jpg").write_text(SECRET)
    (root / "train" / "cat" / "evil.jpg").symlink_to(tmp_path / "secret.txt")
    (root / "train" / "linked").symlink_to(outside, target_is_directory=True)
    (root / "train" / "cat" / "loop.jpg").symlink_to(root / "train" / "cat" / "loop.jpg")
    paths = {
        "ok": "train/cat/ok.jpg",
        "dotdot": "../secret.txt",
        "etc-passwd": "../../etc/passwd",
        "dotdot-deep": UP_TO_ROOT + "etc/passwd",
        "dotdot-inside": "train/cat/../../../secret.txt",
        "absolute": "/etc/passwd",
        "absolute-secret": str(tmp_path / "secret.txt"),
        "symlink-file": "train/cat/evil.jpg",
        "symlink-dir": "train/linked/secret.jpg",
        "symlink-loop": "train/cat/loop.jpg",
        "directory": "train/cat",
        "collection-root": ".",
        "nul-byte": "train/cat/ok.jpg\x00.png",
        "too-long": "train/" + "x" * 5000 + ".jpg",
        "backslashes": "..\\..\\secret.txt",
    }
    state = tmp_path / "state"
    store = FaissStore(state / "index.npz")
    await store.open(dims=26, model_version="fixed-model")
    vector = np.eye(26, dtype=np.float32)[0]
    source = str(root.resolve())
    await store.upsert([make_document(id, vector, filename=Path(path).name or "x", path=path, source=source,
                                      model_version="fixed-model") for id, path in paths.items()])
    await store.flush()
    return state, root, paths


@pytest.fixture
async def gallery_client(gallery, cbir_env: Path) -> httpx.AsyncClient:
    from services.search.app import create_app
    from services.wiring import build_store

    state, root, _ = gallery
    settings = SearchSettings(state_dir=state, data_dir=root)
    app = create_app(settings, embedder_factory=FixedEmbedder, store_factory=partial(build_store, settings))
    async with asgi_client(app) as client:
        yield client


async def test_indexed_image_inside_the_collection_is_served(gallery_client: httpx.AsyncClient) -> None:
    response = await gallery_client.get("/images/ok")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"


TRAPS = ["dotdot", "etc-passwd", "dotdot-deep", "dotdot-inside", "absolute", "absolute-secret", "symlink-file",
         "symlink-dir", "symlink-loop", "directory", "collection-root", "nul-byte", "too-long", "backslashes"]


@pytest.mark.parametrize("id", TRAPS)
async def test_stored_path_leading_outside_is_404(gallery_client: httpx.AsyncClient, id: str) -> None:
    response = await gallery_client.get(f"/images/{id}")
    assert response.status_code == 404, response.text
    assert SECRET not in response.text and "root:" not in response.text
    assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize("raw_path", [
    "/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e", "/images/%2E%2E%2Fsecret.txt", "/images//etc/passwd",
    "/images/%2Fetc%2Fpasswd", "/images/..%5C..%5Csecret.txt", "/images/ok%00.png", "/images/" + "%2e%2e/" * 10,
    "/images/ok/..%2F..%2Fsecret.txt",
])
async def test_hostile_ids_in_the_url_are_404(gallery_client: httpx.AsyncClient, raw_path: str) -> None:
    # Sent as raw bytes: httpx would otherwise normalise the dot segments away before they reach the app.
    request = gallery_client.build_request("GET", "http://test")
    request.url = request.url.copy_with(raw_path=raw_path.encode())
    response = await gallery_client.send(request)
    assert response.status_code == 404, (raw_path, response.text)
    assert SECRET not in response.text and "root:" not in response.text


# --- API keys ----------------------------------------------------------------------------------

KEYS = '["key-one-4f9a", "key-two-77b1"]'


@pytest.fixture
async def keyed_clients(indexed_state: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, httpx.AsyncClient]:
    from services.serve.apps import embedder_app, gateway_app

    monkeypatch.setenv("CBIR_API_KEYS", KEYS)
    async with asgi_client(gateway_app()) as search, asgi_client(embedder_app()) as embedder:
        yield {"/search": search, "/embed": embedder}


def upload(endpoint: str, image: bytes) -> dict:
    return {("file" if endpoint == "/search" else "files"): ("q.jpg", image, "image/jpeg")}


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
@pytest.mark.parametrize("key", [None, "", "wrong", "key-one", "KEY-ONE-4F9A", "key-one-4f9a ", "key-one-4f9akey"])
async def test_missing_or_wrong_key_is_401(keyed_clients: dict[str, httpx.AsyncClient], test_image: bytes,
                                           endpoint: str, key: str | None) -> None:
    headers = {} if key is None else {"X-API-Key": key}
    response = await keyed_clients[endpoint].post(endpoint, files=upload(endpoint, test_image), headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["detail"] == "missing or invalid X-API-Key header"
    assert response.headers["www-authenticate"] == "ApiKey"


async def test_non_ascii_key_is_401(keyed_clients: dict[str, httpx.AsyncClient], test_image: bytes) -> None:
    response = await keyed_clients["/search"].post("/search", files=upload("/search", test_image),
                                                   headers={"X-API-Key": b"key-one-4f9a\xff\xfe"})
    assert response.status_code == 401


async def test_key_is_checked_before_the_body_is_judged(keyed_clients: dict[str, httpx.AsyncClient]) -> None:
    # Without a key, a malformed request learns nothing about what the API expects.
    response = await keyed_clients["/search"].post("/search", params={"k": "many"})
    assert response.status_code == 401


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
@pytest.mark.parametrize("key", ["key-one-4f9a", "key-two-77b1"])
async def test_any_configured_key_is_accepted(keyed_clients: dict[str, httpx.AsyncClient], test_image: bytes,
                                              endpoint: str, key: str) -> None:
    response = await keyed_clients[endpoint].post(endpoint, files=upload(endpoint, test_image),
                                                  headers={"X-API-Key": key})
    assert response.status_code == 200, response.text


async def test_keys_are_off_by_default(search_client: httpx.AsyncClient, embedder_client: httpx.AsyncClient,
                                       test_image: bytes) -> None:
    assert (await search_client.post("/search", files=upload("/search", test_image))).status_code == 200
    assert (await embedder_client.post("/embed", files=upload("/embed", test_image))).status_code == 200


async def test_operational_routes_stay_open_with_keys(keyed_clients: dict[str, httpx.AsyncClient]) -> None:
    assert (await keyed_clients["/search"].get("/healthz")).status_code == 200
    assert (await keyed_clients["/embed"].get("/healthz")).status_code == 200


@pytest.mark.parametrize("placeholder", ["changeme", "secret", ""])
def test_placeholder_keys_are_refused_outside_development(placeholder: str) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        UploadSettings(environment="production", api_keys=[placeholder])
    assert UploadSettings(environment="development", api_keys=[placeholder]).api_keys


# --- CORS ---------------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}


def cors_client(tmp_path: Path, origins: list[str]):
    from services.search.app import create_app
    from services.wiring import build_store

    settings = SearchSettings(state_dir=tmp_path / "state", cors_origins=origins, max_upload_bytes=4096)
    return asgi_client(create_app(settings, embedder_factory=FixedEmbedder,
                                  store_factory=partial(build_store, settings)))


async def test_cors_is_closed_by_default(tmp_path: Path, cbir_env: Path) -> None:
    async with cors_client(tmp_path, []) as client:
        preflight = await client.options("/search", headers={"Origin": "https://ui.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in preflight.headers
        simple = await client.get("/healthz", headers={"Origin": "https://ui.example"})
        assert "access-control-allow-origin" not in simple.headers


async def test_cors_allows_only_the_configured_origins(tmp_path: Path, cbir_env: Path) -> None:
    async with cors_client(tmp_path, ["https://ui.example"]) as client:
        allowed = await client.options("/search", headers={"Origin": "https://ui.example", **PREFLIGHT})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in allowed.headers
        other = await client.options("/search", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        simple = await client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers


async def test_cors_headers_are_on_error_responses_too(tmp_path: Path, cbir_env: Path) -> None:
    # A browser client can only read why it was refused (413, 415...) if the refusal carries the header.
    async with cors_client(tmp_path, ["https://ui.example"]) as client:
        for expected, files in ((413, {"file": ("big.bin", b"\0" * 8192, "image/png")}),
                                (415, {"file": ("x.png", b"nope", "image/png")})):
            response = await client.post("/search", files=files, headers={"Origin": "https://ui.example"})
            assert response.status_code == expected, response.text
            assert response.headers.get("access-control-allow-origin") == "https://ui.example", response.status_code


# --- secrets stay secret -------------------------------------------------------------------------

ES_PASSWORD, ES_API_KEY, CLIENT_KEY = "hunter2-es-password", "es-api-key-0xdeadbeef", "client-key-s3cr3t"


def test_settings_never_show_secrets() -> None:
    settings = SearchSettings(es_password=ES_PASSWORD, es_api_key=ES_API_KEY, es_username="elastic",
                              api_keys=[CLIENT_KEY])
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.model_dump()),
                 repr(settings.api_keys), f"{settings.es_password}"):
        for secret in (ES_PASSWORD, ES_API_KEY, CLIENT_KEY):
            assert secret not in text


def test_elasticsearch_store_names_its_url_without_credentials(caplog: pytest.LogCaptureFixture) -> None:
    from services.common.stores.elasticsearch import ElasticsearchStore

    settings = SearchSettings(backend="elasticsearch", es_url="http://elastic:url-password@localhost:9200",
                              es_username="elastic", es_password=ES_PASSWORD)
    with caplog.at_level(logging.DEBUG):
        store = ElasticsearchStore.from_settings(settings)
    for text in (store.url, repr(store), caplog.text):
        assert ES_PASSWORD not in text and "url-password" not in text


async def test_keys_never_reach_the_logs(indexed_state: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture, test_image: bytes) -> None:
    from services.serve.apps import gateway_app

    monkeypatch.setenv("CBIR_API_KEYS", f'["{CLIENT_KEY}"]')
    monkeypatch.setenv("CBIR_ES_PASSWORD", ES_PASSWORD)
    with caplog.at_level(logging.DEBUG):
        async with asgi_client(gateway_app()) as client:
            wrong = await client.post("/search", files=upload("/search", test_image),
                                      headers={"X-API-Key": "guess-" + CLIENT_KEY})
            right = await client.post("/search", files=upload("/search", test_image), headers={"X-API-Key": CLIENT_KEY})
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert CLIENT_KEY not in wrong.text
    assert CLIENT_KEY not in caplog.text and ES_PASSWORD not in caplog.text
