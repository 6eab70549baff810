"""The model rollover's steps (services/serve/rollover.py): where a rebuild goes, what recording a new pair
keeps and removes, what is carried over from the served index to its successor, and what promote refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import make_document, make_documents
from fakes import FixedEmbedder
from sample_images import encode, sample_image

from services.common.documents import UPLOAD_SOURCE
from services.common.embedding import EmbedderInfo
from services.common.errors import ConfigError
from services.common.stores.faiss import FaissStore
from services.indexer.serving import ServingRecord, read_record, write_record
from services.indexer.settings import IndexerSettings
from services.serve.rollover import carry_over_uploads, promote, rebuild_beside, record_served

pytestmark = pytest.mark.anyio


def model(version: str, *, bundle: str = "bundle-a", pca_dims: int = 8) -> EmbedderInfo:
    return EmbedderInfo(model_version=version, dims=pca_dims + 2, classes=["cat", "dog"], metadata={},
                        bundle_version=bundle, pca_dims=pca_dims, onehot_weight=2.0, device="cpu",
                        image_size=32, resize="lanczos")


def settings(state: Path, **values: object) -> IndexerSettings:
    return IndexerSettings(_env_file=None, state_dir=state, **values)  # type: ignore[call-arg]


def test_a_rebuild_goes_beside_the_served_index_only_when_that_one_is_another_models(tmp_path: Path) -> None:
    assert rebuild_beside(settings(tmp_path), model("m2")) is None  # nothing recorded yet: in place
    write_record(tmp_path, ServingRecord(model_version="m1", index="index.npz", model_dir="models/a", pca_dims=8,
                                         onehot_weight=2.0))
    assert rebuild_beside(settings(tmp_path), model("m1")) is None  # the served model itself: in place
    assert rebuild_beside(settings(tmp_path), model("m2/x")) == tmp_path / "index-m2-x.npz"
    assert rebuild_beside(settings(tmp_path, embedder_url="http://embedder:8001"), model("m2")) is None
    assert rebuild_beside(settings(tmp_path, backend="elasticsearch"), model("m2")) is None


def test_recording_a_pair_keeps_its_bundle_and_forgets_the_pair_before(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    state = tmp_path / "state"
    state.mkdir()
    first = record_served(state, model("a-d8-w2"), bundle_dir=bundle, index="index.npz")
    assert first == ServingRecord(model_version="a-d8-w2", index="index.npz", model_dir="models/bundle-a",
                                  pca_dims=8, onehot_weight=2.0)
    assert read_record(state) == first and (state / "models/bundle-a/bundle.json").is_file()
    (state / "index.npz").write_bytes(b"the first index")
    second = record_served(state, model("b-d4-w2", bundle="bundle-b", pca_dims=4), bundle_dir=bundle,
                           index="index-b-d4-w2.npz")
    assert json.loads((state / "serving.json").read_text())["model_version"] == "b-d4-w2"
    assert read_record(state) == second
    assert not (state / "index.npz").exists() and not (state / "models/bundle-a").exists()
    assert (state / "models/bundle-b/bundle.json").is_file()


async def test_uploads_and_deletions_are_carried_over_and_collection_images_are_not(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "kept.png").write_bytes(encode(sample_image(), "PNG"))
    served = FaissStore(tmp_path / "served.npz")
    successor = FaissStore(tmp_path / "successor.npz")
    await served.open(dims=16, model_version="old")
    await successor.open(dims=26, model_version="fixed-model")
    collection = make_documents(3, model_version="old")
    await served.upsert([*collection,
                         make_document("kept", np.eye(16, dtype=np.float32)[1], model_version="old",
                                       source=UPLOAD_SOURCE, path="kept.png"),
                         make_document("fileless", np.eye(16, dtype=np.float32)[2], model_version="old",
                                       source=UPLOAD_SOURCE, path="fileless.png")])
    embedder = FixedEmbedder()  # the successor's model: 26 dims
    vector = embedder.vector
    await successor.upsert([make_document("removed-meanwhile", vector, model_version="fixed-model",
                                          source=UPLOAD_SOURCE, path="removed.png"),
                            make_document(collection[0].id, vector, model_version="fixed-model"),
                            make_document(collection[1].id, vector, model_version="fixed-model")])

    added, removed = await carry_over_uploads(served, successor, embedder, {collection[1].id}, uploads_dir=uploads)

    assert (added, removed) == (1, 2)  # "fileless" has no file to embed; a deletion replayed, one upload gone
    kept = await successor.get("kept")
    assert kept is not None and kept.model_version == "fixed-model" and kept.source == UPLOAD_SOURCE
    assert kept.predicted_label == "cat" and kept.path == "kept.png"
    np.testing.assert_allclose((await successor.vectors(["kept"]))["kept"], vector)
    assert await successor.get("removed-meanwhile") is None and await successor.get(collection[1].id) is None
    assert await successor.get(collection[0].id) is not None  # the collection is the rebuild's own business
    assert await successor.get(collection[2].id) is None  # ...so nothing of it is copied over
    await served.close()
    await successor.close()


async def test_promote_is_for_elasticsearch_and_says_what_one_machine_does(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cbir serve and cbir index --rebuild swap to the new model by themselves"):
        await promote(settings(tmp_path), "any-version")
