"""The index as the store states it (services/common/stores/elasticsearch/mapping.py): the pure parts called
with dicts; then `CBIR_ES_INDEX_OPTIONS`, the `index_options` of a new index's vectors, through the store and the
double, which holds them to what Elasticsearch 8.19 accepts (tests/es_double.py, `INDEX_OPTION_PARAMS`).

The shipped model's vectors have 74 dims; the bbq types need at least 64, so the tests of every option use 74
and the one of the 64-dim floor uses the factories' 16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import pytest
from elasticsearch import ApiError, AsyncElasticsearch
from es_double import EsDouble
from es_fixtures import es_settings
from factories import DIMS, make_document, make_documents, unit_vectors

from services.common.documents import DOCUMENT_SCHEMA
from services.common.errors import ConfigError, StoreMismatchError
from services.common.settings import StoreSettings
from services.common.stores.base import StoreInfo
from services.common.stores.elasticsearch import INDEX_OPTIONS, ElasticsearchStore
from services.common.stores.elasticsearch.mapping import (
    VECTOR_FIELD,
    check_index_options,
    check_vector_mapping,
    claimed_mapping,
    document_source,
    index_body,
    mapping_of,
    note_index_options,
    require_known_index_options,
    store_info,
    stored_image,
    versioned_index,
)

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio

MODEL = "model-a"
SHIPPED_DIMS = 74  # 64 PCA dims + 10 class scores: the shipped bundle's vectors
WHERE = "Elasticsearch index 'i' at http://es:9200"
MAPPING_LOGGER = "services.common.stores.elasticsearch.mapping"


def body(kind: str = "hnsw", dims: int = DIMS) -> dict[str, Any]:
    return index_body(dims=dims, model_version=MODEL, shards=3, replicas=1, index_options=kind)


# -- the pure parts -------------------------------------------------------------------------------------------------


def test_the_index_body_states_shards_a_strict_mapping_and_the_model() -> None:
    new = body()
    assert new["settings"] == {"number_of_shards": 3, "number_of_replicas": 1}
    mappings = new["mappings"]
    assert mappings["dynamic"] == "strict"
    assert mappings["_meta"] == {"model_version": MODEL, "schema": DOCUMENT_SCHEMA}
    assert mappings["properties"][VECTOR_FIELD] == {"type": "dense_vector", "dims": DIMS, "similarity": "cosine",
                                                     "index": True, "index_options": {"type": "hnsw"}}
    assert set(mappings["properties"]) == set(document_source(make_documents(1)[0]))  # every field a document has
    assert mappings["properties"]["path"] == {"type": "keyword", "index": False}  # returned, never queried


@pytest.mark.parametrize(("kind", "rescore"), [("hnsw", None), ("flat", None), ("int8_hnsw", 2.0),
                                               ("int8_flat", 2.0), ("bbq_hnsw", 5.0), ("bbq_flat", 5.0)])
def test_quantised_vectors_are_rescored_with_the_float_ones_and_float_vectors_are_not(
        kind: str, rescore: float | None) -> None:
    options = body(kind, dims=SHIPPED_DIMS)["mappings"]["properties"][VECTOR_FIELD]["index_options"]
    expected: dict[str, Any] = {"type": kind}
    if rescore is not None:
        expected["rescore_vector"] = {"oversample": rescore}
    assert options == expected


def test_bbq_is_refused_below_64_dims_and_every_other_option_is_not() -> None:
    for kind in ("bbq_hnsw", "bbq_flat"):
        with pytest.raises(ConfigError, match=f"CBIR_ES_INDEX_OPTIONS={kind} needs vectors of at least 64 dims"):
            check_index_options(kind, 63)
        check_index_options(kind, 64)
    for kind in ("hnsw", "int8_hnsw", "flat", "int8_flat"):
        check_index_options(kind, 1)


def test_only_the_options_of_the_setting_are_known() -> None:
    assert require_known_index_options("int8_flat") == "int8_flat"
    with pytest.raises(ConfigError, match="CBIR_ES_INDEX_OPTIONS 'int4_hnsw' is not one of: hnsw, int8_hnsw"):
        require_known_index_options("int4_hnsw")


def test_a_claimed_index_records_the_model_and_schema_and_keeps_its_vectors() -> None:
    vector = {"type": "dense_vector", "dims": DIMS, "similarity": "cosine", "index_options": {"type": "int8_flat"}}
    claimed = claimed_mapping(vector, model_version="model-b")
    assert claimed["meta"] == {"model_version": "model-b", "schema": DOCUMENT_SCHEMA}
    assert claimed["properties"][VECTOR_FIELD] is vector
    assert {name: spec for name, spec in claimed["properties"].items() if name != VECTOR_FIELD} == {
        name: spec for name, spec in body()["mappings"]["properties"].items() if name != VECTOR_FIELD}


def test_a_mapping_is_read_back_into_store_info() -> None:
    mappings = body()["mappings"]
    assert store_info(mappings, count=7) == StoreInfo(dims=DIMS, model_version=MODEL, count=7, schema=DOCUMENT_SCHEMA)
    older = {**mappings, "_meta": {"model_version": MODEL}}  # written before the schema was recorded
    assert store_info(older, count=7).schema == 1
    assert store_info({}, count=0) == StoreInfo(dims=None, model_version=None, count=0, schema=1)
    assert mapping_of({"cbir-images-v1": {"mappings": mappings}}) is mappings  # keyed by the concrete index


@pytest.mark.parametrize("vector", [None, {"type": "keyword"},
                                    {"type": "dense_vector", "dims": DIMS, "similarity": "dot_product"}])
def test_an_index_without_cosine_vectors_is_refused(vector: dict[str, Any] | None) -> None:
    mappings = body()["mappings"]
    properties = {name: spec for name, spec in mappings["properties"].items() if name != VECTOR_FIELD}
    if vector is not None:
        properties[VECTOR_FIELD] = vector
    with pytest.raises(StoreMismatchError, match=f"{WHERE} has no cosine dense_vector field 'features'"):
        check_vector_mapping({**mappings, "properties": properties}, where=WHERE)
    check_vector_mapping(mappings, where=WHERE)


def test_other_index_options_than_the_setting_are_noted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=MAPPING_LOGGER)
    note_index_options({"index_options": {"type": "hnsw", "m": 16}}, "hnsw", where=WHERE)
    assert not caplog.records
    note_index_options({"index_options": {"type": "hnsw", "m": 16}}, "int8_flat", where=WHERE)
    assert [record.getMessage() for record in caplog.records] == [
        f"{WHERE} keeps its vector index_options hnsw; CBIR_ES_INDEX_OPTIONS=int8_flat applies to indices created "
        "from now on (delete the index or set another CBIR_ES_INDEX, then cbir index)"]


def test_a_document_source_holds_every_stored_field_and_the_vector_and_reads_back() -> None:
    document = make_document("a", unit_vectors(1)[0].astype(np.float64), label=None)
    source = document_source(document)
    assert source[VECTOR_FIELD] == pytest.approx(unit_vectors(1)[0].tolist()) and len(source[VECTOR_FIELD]) == DIMS
    assert all(isinstance(value, float) for value in source[VECTOR_FIELD])  # JSON numbers, not numpy scalars
    assert stored_image(source) == document.stored()
    assert stored_image({"id": "b"}).label is None  # a field absent from _source is None


def test_a_versioned_index_name_is_one_elasticsearch_accepts() -> None:
    assert versioned_index("cbir-images", "v1") == "cbir-images-v1"
    assert versioned_index("cbir-images", "VGG16/10c w2.5:#1") == "cbir-images-vgg16-10c-w2.5--1"


# -- CBIR_ES_INDEX_OPTIONS through the store ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", get_args(StoreSettings.model_fields["es_index_options"].annotation))
async def test_every_option_the_setting_accepts_makes_an_index_elasticsearch_accepts(
    es_double: EsDouble, kind: str
) -> None:
    store = ElasticsearchStore.from_settings(es_settings(es_double, es_index_options=kind))  # the store takes it
    await store.close()
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.create(index="v", **index_body(dims=SHIPPED_DIMS, model_version=MODEL, shards=1,
                                                            replicas=0, index_options=kind))
        shown = mapping_of((await client.indices.get_mapping(index="v")).body)
    assert shown["properties"][VECTOR_FIELD]["index_options"]["type"] == kind


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
    caplog.set_level(logging.WARNING, logger=MAPPING_LOGGER)
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
