"""`CBIR_ES_INDEX_OPTIONS`: the `index_options` of a new index's vectors, and the double holding them to what
Elasticsearch 8.19 accepts (tests/es_double.py, `INDEX_OPTION_PARAMS`).

The shipped model's vectors have 74 dims; the bbq types need at least 64, so the tests of every option use 74
and the one of the 64-dim floor uses the factories' 16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from elasticsearch import ApiError, AsyncElasticsearch
from es_double import EsDouble
from factories import DIMS, make_documents

from services.common.errors import ConfigError
from services.common.settings import StoreSettings
from services.common.stores.elasticsearch import INDEX_OPTIONS, ElasticsearchStore

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio

MODEL = "model-a"
SHIPPED_DIMS = 74  # 64 PCA dims + 10 class scores: the shipped bundle's vectors


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def test_the_options_are_those_of_the_setting() -> None:
    assert INDEX_OPTIONS == ("hnsw", "int8_hnsw", "bbq_hnsw", "flat", "int8_flat", "bbq_flat")
    assert StoreSettings.model_fields["es_index_options"].default == "hnsw"  # today's mapping, unchanged


@pytest.mark.parametrize("kind", INDEX_OPTIONS)
async def test_each_option_creates_an_index_of_that_type_that_knn_searches(
    es_double: EsDouble, make_es_store: MakeEsStore, kind: str
) -> None:
    store = make_es_store(es_index_options=kind, es_search_mode="knn", es_shards=3)
    await store.open(dims=SHIPPED_DIMS, model_version=MODEL)

    options = es_double.indices[store.index].mappings["properties"]["features"]["index_options"]
    assert options["type"] == kind
    if kind.startswith(("int8", "bbq")):  # quantised: the best candidates are rescored with the float vectors
        assert options["rescore_vector"] == {"oversample": 2.0 if kind.startswith("int8") else 5.0}
    else:
        assert "rescore_vector" not in options

    docs = make_documents(120, dims=SHIPPED_DIMS, model_version=MODEL)
    await store.upsert(docs)
    await store.flush()
    vectors = np.stack([doc.vector for doc in docs])
    for doc in docs[:5]:
        hits = await store.search(doc.vector, 10)
        assert hits[0].image.id == doc.id and hits[0].score == pytest.approx(2.0, abs=1e-5)
        if kind.endswith("flat"):  # no graph: every vector compared, so the exact top 10
            exact = np.argsort(-(vectors @ doc.vector), kind="stable")[:10]
            assert [hit.image.id for hit in hits] == [docs[i].id for i in exact]


async def test_bbq_needs_64_dims_and_the_store_says_so_before_asking(
    es_double: EsDouble, make_es_store: MakeEsStore
) -> None:
    for kind in ("bbq_hnsw", "bbq_flat"):
        store = make_es_store(es_index_options=kind)
        with pytest.raises(ConfigError, match=rf"CBIR_ES_INDEX_OPTIONS={kind} needs vectors of at least 64 dims "
                                              rf"and these have {DIMS}"):  # fmt: skip
            await store.open(dims=DIMS, model_version=MODEL)
    assert not es_double.indices  # nothing was created
    small = make_es_store(es_index_options="int8_hnsw")  # the small test vectors suit every other option
    await small.open(dims=DIMS, model_version=MODEL)
    assert es_double.indices[small.index].mappings["properties"]["features"]["index_options"]["type"] == "int8_hnsw"


def test_a_value_elasticsearch_has_but_we_do_not_offer_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("CBIR_ES_INDEX_OPTIONS", "int4_hnsw")
    with pytest.raises(ConfigError, match=r"CBIR_ES_INDEX_OPTIONS: Input should be 'hnsw', 'int8_hnsw', 'bbq_hnsw', "
                                          r"'flat', 'int8_flat' or 'bbq_flat' \(got 'int4_hnsw'\)"):  # fmt: skip
        StoreSettings.load()
    monkeypatch.setenv("CBIR_ES_INDEX_OPTIONS", "bbq_flat")
    assert StoreSettings.load().es_index_options == "bbq_flat"


async def test_a_store_built_by_hand_refuses_an_unknown_option() -> None:
    client = AsyncElasticsearch("http://127.0.0.1:9")
    try:
        with pytest.raises(ConfigError, match="CBIR_ES_INDEX_OPTIONS 'ivf' is not one of: hnsw, int8_hnsw"):
            ElasticsearchStore(client, index="i", url="http://127.0.0.1:9", index_options="ivf")
    finally:
        await client.close()


async def test_an_existing_index_keeps_its_options(
    es_double: EsDouble, make_es_store: MakeEsStore, caplog: pytest.LogCaptureFixture
) -> None:
    await make_es_store().open(dims=SHIPPED_DIMS, model_version=MODEL)  # hnsw
    caplog.set_level(logging.WARNING, logger="services.common.stores.elasticsearch.mapping")
    quantised = make_es_store(es_index_options="bbq_hnsw")
    await quantised.open(dims=SHIPPED_DIMS, model_version=MODEL)
    await make_es_store(es_index_options="int8_flat").open(dims=SHIPPED_DIMS, model_version="model-b")  # claims it

    index = es_double.indices[quantised.index]
    assert index.mappings["properties"]["features"]["index_options"]["type"] == "hnsw"
    assert index.mappings["_meta"]["model_version"] == "model-b"
    assert "keeps its vector index_options hnsw; CBIR_ES_INDEX_OPTIONS=bbq_hnsw applies to indices created from " \
           "now on" in caplog.text  # fmt: skip


# -- the double: what Elasticsearch 8.19 accepts, and how GET _mapping shows it ------------------------------------

ACCEPTED: list[tuple[dict[str, Any], int, dict[str, Any]]] = [
    ({"type": "hnsw"}, 3, {"type": "hnsw", "m": 16, "ef_construction": 100}),
    ({"type": "hnsw", "m": 32, "ef_construction": 200}, 3, {"type": "hnsw", "m": 32, "ef_construction": 200}),
    ({"type": "int8_hnsw", "confidence_interval": 0.95, "rescore_vector": {"oversample": 2}}, 3,
     {"type": "int8_hnsw", "m": 16, "ef_construction": 100, "confidence_interval": 0.95,
      "rescore_vector": {"oversample": 2.0}}),
    ({"type": "int4_hnsw"}, 4, {"type": "int4_hnsw", "m": 16, "ef_construction": 100, "confidence_interval": 0.0}),
    ({"type": "bbq_hnsw", "m": 24}, 64, {"type": "bbq_hnsw", "m": 24, "ef_construction": 100,
                                         "rescore_vector": {"oversample": 3.0}}),
    ({"type": "bbq_hnsw", "rescore_vector": {"oversample": 0}}, 74,
     {"type": "bbq_hnsw", "m": 16, "ef_construction": 100, "rescore_vector": {"oversample": 0.0}}),
    ({"type": "flat"}, 3, {"type": "flat"}),
    ({"type": "int8_flat"}, 3, {"type": "int8_flat"}),
    ({"type": "int4_flat", "rescore_vector": {"oversample": 10}}, 2,
     {"type": "int4_flat", "confidence_interval": 0.0, "rescore_vector": {"oversample": 10.0}}),
    ({"type": "bbq_flat"}, 64, {"type": "bbq_flat", "rescore_vector": {"oversample": 3.0}}),
    (None, 3, {"type": "int8_hnsw", "m": 16, "ef_construction": 100}),  # 8.14+'s default for float vectors
]


@pytest.mark.parametrize(("options", "dims", "shown"), ACCEPTED)
async def test_the_double_accepts_what_elasticsearch_accepts_and_shows_its_defaults(
    es_double: EsDouble, options: dict[str, Any] | None, dims: int, shown: dict[str, Any]
) -> None:
    vector: dict[str, Any] = {"type": "dense_vector", "dims": dims, "similarity": "cosine"}
    if options is not None:
        vector["index_options"] = options
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.create(index="v", mappings={"properties": {"f": vector}})
        mapping = (await client.indices.get_mapping(index="v"))["v"]["mappings"]
        assert mapping["properties"]["f"]["index_options"] == shown
        await client.indices.put_mapping(index="v", properties=mapping["properties"])  # the same again: no change


REFUSED: list[tuple[dict[str, Any], dict[str, Any], str, str]] = [
    ({"type": "ivf"}, {}, "mapper_parsing_exception", "Unknown vector index options type [ivf] for field [f]"),
    ({"type": "bbq_disk"}, {}, "mapper_parsing_exception",  # 9.2
     "Unknown vector index options type [bbq_disk] for field [f]"),
    ({}, {}, "mapper_parsing_exception", "[index_options] requires field [type] to be configured"),
    ({"type": "hnsw", "confidence_interval": 0.9}, {}, "mapper_parsing_exception",
     "Mapping definition for [f] has unsupported parameters:  [confidence_interval : 0.9]"),
    ({"type": "hnsw", "rescore_vector": {"oversample": 2}}, {}, "mapper_parsing_exception",
     "Mapping definition for [f] has unsupported parameters:  [rescore_vector : {oversample=2}]"),
    ({"type": "hnsw", "early_exit": True}, {}, "mapper_parsing_exception",  # 9.x
     "Mapping definition for [f] has unsupported parameters:  [early_exit : true]"),
    ({"type": "flat", "m": 16, "ef_construction": 100}, {}, "mapper_parsing_exception",
     "Mapping definition for [f] has unsupported parameters:  [m : 16] [ef_construction : 100]"),
    ({"type": "bbq_hnsw", "confidence_interval": 0.9}, {"dims": 64}, "mapper_parsing_exception",
     "Mapping definition for [f] has unsupported parameters:  [confidence_interval : 0.9]"),
    ({"type": "bbq_hnsw"}, {"dims": 16}, "illegal_argument_exception",
     "bbq_hnsw does not support dimensions fewer than 64; provided=16"),
    ({"type": "bbq_flat"}, {"dims": 63}, "illegal_argument_exception",
     "bbq_flat does not support dimensions fewer than 64; provided=63"),
    ({"type": "int4_hnsw"}, {"dims": 7}, "illegal_argument_exception", "int4_hnsw only supports even dimensions; "
                                                                        "provided=7"),
    ({"type": "int8_hnsw", "rescore_vector": {}}, {}, "illegal_argument_exception",
     "Invalid rescore_vector value. Missing required field oversample"),
    ({"type": "int8_flat", "rescore_vector": {"oversample": 0.5}}, {}, "illegal_argument_exception",
     "oversample must be greater than 1 or exactly 0"),
    ({"type": "bbq_hnsw", "rescore_vector": {"oversample": 11}}, {"dims": 64}, "illegal_argument_exception",
     "oversample must be less than or equal to 10"),
    ({"type": "int8_hnsw"}, {"element_type": "byte"}, "illegal_argument_exception",
     "[element_type] cannot be [byte] when using index type [int8_hnsw]"),
    ({"type": "hnsw", "m": "many"}, {}, "number_format_exception", 'For input string: "many"'),
    ({"type": "hnsw"}, {"index": False, "similarity": None}, "illegal_argument_exception",
     "Field [index_options] can only be specified for a field of type [dense_vector] when it is indexed"),
]


@pytest.mark.parametrize(("options", "field", "cause", "reason"), REFUSED)
async def test_the_double_refuses_what_elasticsearch_refuses_with_its_error(
    es_double: EsDouble, options: dict[str, Any], field: dict[str, Any], cause: str, reason: str
) -> None:
    vector = {"type": "dense_vector", "dims": 8, "similarity": "cosine", **field, "index_options": options}
    vector = {key: value for key, value in vector.items() if value is not None}
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        with pytest.raises(ApiError) as caught:
            await client.indices.create(index="v", mappings={"properties": {"f": vector}})
    body = caught.value.body
    assert caught.value.meta.status == 400 and body["status"] == 400
    assert body["error"]["type"] == "mapper_parsing_exception"
    assert body["error"]["reason"] == f"Failed to parse mapping: {reason}"
    assert body["error"]["caused_by"] == {"type": cause, "reason": reason}
    # The root cause: the inner error when Elasticsearch made it (an ElasticsearchException), else the wrapper.
    inner = cause in ("mapper_parsing_exception", "parse_exception")
    assert body["error"]["root_cause"] == [{"type": cause, "reason": reason} if inner else
                                           {"type": "mapper_parsing_exception", "reason": body["error"]["reason"]}]
    assert not es_double.indices
