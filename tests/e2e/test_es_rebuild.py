"""The compose procedure for a new model, on the Elasticsearch double with the real commands: the old gateway
serves while `cbir index --rebuild` fills the new model's index beside it; uploads and deletions made meanwhile
survive `cbir promote`; from then on the old gateway answers 409 (never mixed results) and a gateway with the
new model serves the new index."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from es_double import EsDouble
from servers import asgi_client

from services.cli import main
from services.search import engine

pytestmark = pytest.mark.anyio


@pytest.fixture
def es_env(cbir_env: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> EsDouble:
    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-e2e"), ("CBIR_ES_SHARDS", "3")):
        monkeypatch.setenv(name, value)
    return es_double


async def test_rebuild_beside_the_served_index_then_promote(es_env: EsDouble, test_image: bytes, mini_collection: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serve.apps import gateway_app

    await asyncio.to_thread(main, ["index", "--no-progress"])
    [old_index] = es_env.aliases["cbir-e2e"]
    files = {"file": ("q.jpg", test_image, "image/jpeg")}
    async with asgi_client(gateway_app(), base_url="http://127.0.0.1") as old_gateway:
        old_version = (await old_gateway.get("/healthz")).json()["model_version"]
        before = (await old_gateway.post("/images", files={"file": ("a.jpg", test_image, "image/jpeg")})).json()

        monkeypatch.setenv("CBIR_PCA_DIMS", "8")  # the new model, for the commands run from now on
        await asyncio.to_thread(main, ["index", "--rebuild", "--no-progress"])
        assert es_env.aliases["cbir-e2e"] == {old_index} and len(es_env.indices) == 2  # the alias has not moved
        [new_index] = set(es_env.indices) - {old_index}
        served = await old_gateway.post("/search", params={"k": 3}, files=files)
        assert served.status_code == 200 and served.json()["model_version"] == old_version

        other = (mini_collection / "test" / "dog" / "0000.jpg").read_bytes()
        during = (await old_gateway.post("/images", files={"file": ("b.jpg", other, "image/jpeg")})).json()
        doomed = next(hit["id"] for hit in served.json()["hits"] if hit["id"] != before["id"])
        assert (await old_gateway.delete(f"/images/{doomed}")).status_code == 204

        new_version = es_env.indices[new_index].mappings["_meta"]["model_version"]
        await asyncio.to_thread(main, ["promote", new_version])
        assert es_env.aliases["cbir-e2e"] == {new_index}

        monkeypatch.setattr(engine, "VERIFY_EVERY_S", 0.0)
        refused = await old_gateway.post("/search", params={"k": 3}, files=files)
        assert refused.status_code == 409 and new_version in refused.json()["detail"]

    async with asgi_client(gateway_app(), base_url="http://127.0.0.1") as new_gateway:
        health = (await new_gateway.get("/healthz")).json()
        assert health["status"] == "ready" and health["model_version"] == new_version
        for upload in (before, during):
            meta = (await new_gateway.get(f"/images/{upload['id']}/meta")).json()
            assert meta["model_version"] == new_version and meta["source"] == "upload"
        assert (await new_gateway.get(f"/images/{doomed}/meta")).status_code == 404
        assert (await new_gateway.get("/collection")).json()["sources"]["upload"] == 2
        answer = (await new_gateway.post("/search", params={"k": 3}, files=files)).json()
        assert answer["model_version"] == new_version and answer["hits"][0]["id"] == before["id"]


async def test_an_elasticsearch_index_from_before_aliases_is_refused_by_every_command_then_rebuilt_and_promoted(
        es_env: EsDouble, test_image: bytes) -> None:
    from services.serve.apps import gateway_app

    await asyncio.to_thread(main, ["index", "--no-progress"])
    [versioned] = es_env.aliases.pop("cbir-e2e")  # made into the layout before versioned indices: the same
    old = es_env.indices.pop(versioned)           # documents in a concrete index named CBIR_ES_INDEX
    es_env.write_flags.clear()
    old.name = "cbir-e2e"
    es_env.indices["cbir-e2e"] = old
    documents = dict(old.docs)
    version = old.mappings["_meta"]["model_version"]
    before = len(es_env.requests)

    with pytest.raises(SystemExit):
        await asyncio.to_thread(main, ["index", "--no-progress"])
    files = {"file": ("q.jpg", test_image, "image/jpeg")}
    async with asgi_client(gateway_app(), base_url="http://127.0.0.1") as gateway:
        for answer in (await gateway.post("/search", params={"k": 3}, files=files),
                       await gateway.post("/images", files={"file": ("a.jpg", test_image, "image/jpeg")})):
            assert answer.status_code == 409, answer.text
            detail = answer.json()["detail"]
            assert "'cbir-e2e'" in detail and "`cbir index --rebuild`" in detail and "`cbir promote VERSION`" in detail
    changed = [(method, path) for method, path in es_env.requests[before:]
               if method in ("PUT", "DELETE") or (method == "POST" and not path.endswith(
                   ("/_search", "/_msearch", "/_count", "/_mget", "/_has_privileges")))]  # fmt: skip
    assert changed == [] and set(es_env.indices) == {"cbir-e2e"} and es_env.indices["cbir-e2e"].docs == documents

    await asyncio.to_thread(main, ["index", "--rebuild", "--no-progress"])  # beside it
    assert set(es_env.indices) == {"cbir-e2e", versioned} and es_env.aliases == {}
    await asyncio.to_thread(main, ["promote", version])  # replaces it, in one call
    assert es_env.aliases == {"cbir-e2e": {versioned}} and set(es_env.indices) == {versioned}
    async with asgi_client(gateway_app(), base_url="http://127.0.0.1") as gateway:
        assert (await gateway.get("/healthz")).json()["status"] == "ready"
        assert (await gateway.post("/search", params={"k": 3}, files=files)).status_code == 200
