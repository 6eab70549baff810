"""The index as this store states it: the body of a new index (shards, replicas, the strict mapping and its
dense_vector `index_options`), a document's `_source` and back, and a mapping read back into `StoreInfo`.
Pure: nothing here talks to the cluster."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, get_args

import numpy as np

from services.common.documents import DOCUMENT_SCHEMA, ImageDocument, StoredImage
from services.common.errors import ConfigError, StoreMismatchError
from services.common.settings import StoreSettings
from services.common.stores.base import StoreInfo

logger = logging.getLogger(__name__)

VECTOR_FIELD = "features"  # ES_SCRIPT_SOURCE names this field too
STORED_FIELDS = [field.name for field in dataclasses.fields(StoredImage)]  # every field but the vector

INDEX_OPTIONS_SETTING = "CBIR_ES_INDEX_OPTIONS"
# The dense_vector index_options types CBIR_ES_INDEX_OPTIONS may name: every type of Elasticsearch 8.19 but int4_hnsw
# and int4_flat, which need an even number of dims (CBIR_PCA_DIMS does not promise one).
INDEX_OPTIONS: tuple[str, ...] = get_args(StoreSettings.model_fields["es_index_options"].annotation)
BBQ_MIN_DIMS = 64  # DenseVectorFieldMapper.BBQ_MIN_DIMS: bbq_hnsw and bbq_flat refuse fewer dims
# Quantised vectors are compared approximately; `rescore_vector` has each shard rescore its best k × oversample
# candidates with the float vectors, so the hits and their scores are the float cosine's again. Elastic's kNN guide:
# int8 needs "minimal if any" rescoring, bbq 3-5x oversampling, more "for fewer dimensions" (ours are 74).
RESCORE_OVERSAMPLE = {"int8": 2.0, "bbq": 5.0}


def versioned_index(alias: str, model_version: str) -> str:
    """The concrete index of a model version behind `alias`: lower case, no character an index name refuses."""
    return f"{alias}-{re.sub(r'[^a-z0-9._-]', '-', model_version.lower())}"


def require_known_index_options(kind: str) -> str:
    """`kind` when CBIR_ES_INDEX_OPTIONS may name it (a store built by hand skips the settings' validation)."""
    if kind not in INDEX_OPTIONS:
        raise ConfigError(f"{INDEX_OPTIONS_SETTING} {kind!r} is not one of: {', '.join(INDEX_OPTIONS)}")
    return kind


def check_index_options(kind: str, dims: int) -> None:
    """Refuse what Elasticsearch would refuse for these vectors, before asking it (a 400 would say less)."""
    if kind.startswith("bbq") and dims < BBQ_MIN_DIMS:
        raise ConfigError(
            f"{INDEX_OPTIONS_SETTING}={kind} needs vectors of at least {BBQ_MIN_DIMS} dims and "
            f"these have {dims} (Elasticsearch refuses fewer); choose hnsw or int8_hnsw, or more CBIR_PCA_DIMS"
        )


def vector_index_options(kind: str) -> dict[str, Any]:
    """`index_options` of the vectors of a new index (CBIR_ES_INDEX_OPTIONS). The default, plain float `hnsw`,
    is named because 8.14+ would quantise to int8 unasked and kNN scores would drift ~1e-3 from the exact
    cosine the FAISS store reports; the quantised types rescore with the float vectors (RESCORE_OVERSAMPLE)."""
    options: dict[str, Any] = {"type": kind}
    oversample = RESCORE_OVERSAMPLE.get(kind.split("_")[0])
    if oversample is not None:
        options["rescore_vector"] = {"oversample": oversample}
    return options


def index_body(*, dims: int, model_version: str, shards: int, replicas: int, index_options: str) -> dict[str, Any]:
    """The settings and mappings of a new index of `model_version`'s `dims`-dimensional vectors."""
    vector = {"type": "dense_vector", "dims": dims, "similarity": "cosine", "index": True,
              "index_options": vector_index_options(index_options)}
    return {
        "settings": {"number_of_shards": shards, "number_of_replicas": replicas},
        "mappings": {
            "dynamic": "strict",  # a typo in a field name fails loudly instead of mapping
            **_recorded(model_version, vector),
        },
    }


def claimed_mapping(vector: dict[str, Any], *, model_version: str) -> dict[str, Any]:
    """The `put_mapping` arguments by which `model_version` takes over an empty index left by another model or
    schema: this schema's fields (adding fields is a mapping update Elasticsearch allows) and the vectors as they
    are (`vector`: their index_options are kept for life)."""
    recorded = _recorded(model_version, vector)
    return {"meta": recorded["_meta"], "properties": recorded["properties"]}


def _recorded(model_version: str, vector: dict[str, Any]) -> dict[str, Any]:
    keyword = {"type": "keyword"}
    return {
        # info() works on an empty index; `schema` is DOCUMENT_SCHEMA of the documents it holds.
        "_meta": {"model_version": model_version, "schema": DOCUMENT_SCHEMA},
        "properties": {
            "id": keyword,  # also the sort key of iter_documents
            "filename": keyword,
            "path": {"type": "keyword", "index": False},  # returned, never queried
            "source": keyword,
            "label": keyword,  # null when unknown: absent from the inverted index, as it should be
            "predicted_label": keyword,
            "confidence": {"type": "float", "index": False},
            "size": {"type": "long", "index": False},
            "mtime": {"type": "double", "index": False},
            "model_version": keyword,
            VECTOR_FIELD: vector,
        },
    }


def note_index_options(vector: dict[str, Any], kind: str, *, where: str) -> None:
    """Say so when an existing index was built with other index_options than CBIR_ES_INDEX_OPTIONS names (`kind`):
    a mapping keeps them for life, the setting applies to indices created from now on."""
    existing = (vector.get("index_options") or {}).get("type")
    if existing != kind:
        logger.warning(
            "%s keeps its vector index_options %s; %s=%s applies to indices created from now on "
            "(delete the index or set another CBIR_ES_INDEX, then cbir index)",
            where, existing, INDEX_OPTIONS_SETTING, kind,
        )  # fmt: skip


def check_vector_mapping(mapping: dict[str, Any], *, where: str) -> None:
    """Refuse an index whose vectors this store cannot search (not ours, or not cosine)."""
    vector = mapping.get("properties", {}).get(VECTOR_FIELD)
    if not vector or vector.get("type") != "dense_vector" or vector.get("similarity") != "cosine":
        raise StoreMismatchError(
            f"{where} has no cosine dense_vector field {VECTOR_FIELD!r} (found {vector!r}); "
            "delete it or set CBIR_ES_INDEX to another name"
        )


def mapping_of(body: dict[str, Any]) -> dict[str, Any]:
    """The mapping in a `GET <index>/_mapping` answer: keyed by the concrete index name, which differs from the
    name asked for behind an alias."""
    return next(iter(body.values()))["mappings"]


def store_info(mapping: dict[str, Any], *, count: int) -> StoreInfo:
    """What an index of this mapping holding `count` documents is; a mapping that records no schema is of
    schema 1, from before documents recorded their source and prediction."""
    vector = mapping.get("properties", {}).get(VECTOR_FIELD, {})
    meta = mapping.get("_meta", {})
    return StoreInfo(dims=vector.get("dims"), model_version=meta.get("model_version"), count=count,
                     schema=meta.get("schema", 1))


def document_source(doc: ImageDocument) -> dict[str, Any]:
    """The `_source` of a document: its stored fields and its vector."""
    return {**{name: getattr(doc, name) for name in STORED_FIELDS},
            VECTOR_FIELD: np.asarray(doc.vector, dtype=np.float32).ravel().tolist()}


def stored_image(source: dict[str, Any]) -> StoredImage:
    """A document read back from its `_source` (without its vector)."""
    return StoredImage(**{name: source.get(name) for name in STORED_FIELDS})
