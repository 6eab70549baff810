"""`cbir index` composed (services/serve/indexing.py): one machine's in-process model indexes into the served
FAISS file and records the pair; a rebuild with another model goes beside it; on Elasticsearch a rebuild fills
the index of its model version and leaves the alias where it is."""

from __future__ import annotations

from pathlib import Path

import pytest
from es_double import EsDouble

from services.common.collection import Layout
from services.common.settings import Backend
from services.indexer.pipeline import IndexOptions
from services.indexer.serving import read_record
from services.indexer.settings import IndexerSettings
from services.serve import indexing
from services.serve.indexing import index_into_store, indexing_model

pytestmark = pytest.mark.anyio


def options(*, rebuild: bool = False) -> IndexOptions:
    return IndexOptions(batch_size=64, concurrency=2, rebuild=rebuild, progress_bar=False, layout=Layout.auto)


def settings(tmp_path: Path, bundle: Path, **values: object) -> IndexerSettings:
    return IndexerSettings(_env_file=None, state_dir=tmp_path / "state", model_dir=bundle,  # type: ignore[call-arg]
                           compile="off", **values)


async def test_one_machine_indexes_in_place_records_the_pair_then_rebuilds_beside_it(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path) -> None:
    first = await index_into_store(settings(tmp_path, tiny_bundle_dir), mini_collection, "train", options())
    assert first.counts()["added"] == 500
    record = read_record(tmp_path / "state")
    assert record is not None and record.index == "index.npz" and record.pca_dims == 16
    assert (tmp_path / "state" / record.model_dir / "bundle.json").is_file()

    other = settings(tmp_path, tiny_bundle_dir, pca_dims=8)  # another vector space of the same bundle
    rebuilt = await index_into_store(other, mini_collection, "train", options(rebuild=True))
    assert rebuilt.counts()["added"] == 500
    new = read_record(tmp_path / "state")
    assert new is not None and new.pca_dims == 8 and new.model_version != record.model_version
    assert new.index == f"index-{new.model_version}.npz" and (tmp_path / "state" / new.index).is_file()
    assert not (tmp_path / "state" / "index.npz").exists()  # the pair before is forgotten


async def test_an_elasticsearch_rebuild_fills_its_versioned_index_and_leaves_the_alias(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path, es_double: EsDouble) -> None:
    es = {"backend": Backend.elasticsearch, "es_url": es_double.url, "es_index": "photos", "es_shards": 2}
    await index_into_store(settings(tmp_path, tiny_bundle_dir, **es), mini_collection, "train", options())
    [served] = es_double.aliases["photos"]
    await index_into_store(settings(tmp_path, tiny_bundle_dir, pca_dims=8, **es), mini_collection, "train",
                           options(rebuild=True))
    assert es_double.aliases["photos"] == {served} and len(es_double.indices) == 2
    [rebuilt] = set(es_double.indices) - {served}
    assert rebuilt.startswith("photos-") and rebuilt.endswith("-d8-w2")
    assert read_record(tmp_path / "state") is None  # nothing of one machine's is recorded


@pytest.mark.parametrize(("configured", "runs"), [("auto", "cached"), ("on", "on"), ("cached", "cached"),
                                                  ("off", "off")])
def test_cbir_index_builds_no_package_unless_told_to_compile(configured: str, runs: str) -> None:
    configured_settings = IndexerSettings(_env_file=None, compile=configured)  # type: ignore[call-arg]
    assert indexing_model(configured_settings).compile == runs
    assert configured_settings.compile == configured  # the caller's settings are left as they were


async def test_the_embedding_service_is_built_from_the_indexing_model(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = indexing.build_embedding_service
    monkeypatch.setattr(indexing, "build_embedding_service", lambda s: built.append(s.compile) or real(s))
    auto = settings(tmp_path, tiny_bundle_dir).model_copy(update={"compile": "auto"})
    await index_into_store(auto, mini_collection, "train", options())
    assert built == ["cached"]
