"""The cluster store: image documents in Elasticsearch indices behind an alias (`ElasticsearchStore`)."""

from services.common.stores.elasticsearch.store import INDEX_OPTIONS, ElasticsearchStore, versioned_index

__all__ = ["INDEX_OPTIONS", "ElasticsearchStore", "versioned_index"]
