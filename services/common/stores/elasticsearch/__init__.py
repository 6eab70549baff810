"""The cluster store: image documents in Elasticsearch indices behind an alias (`ElasticsearchStore`).

Elasticsearch does the sharding, replication and persistence; this package only states the mapping, writes through
the bulk helper, and turns every client error into a `CbirError`. Its parts, from the store down:

    store.py     ElasticsearchStore, the VectorStore interface; keeps the state and delegates to
    aliases.py   versioned indices behind one alias: resolve, follow, promote (all or nothing)
    indices.py   create an index and wait for its primaries, read its mapping, delete it
    mapping.py   the index body (mapping, dense_vector index options), a document's _source, StoreInfo
    bulk.py      writes through the async bulk helper, 429 and 503 items retried with backoff
    queries.py   search bodies (exact or kNN), listing and counting, the check of every answer's shards
    preflight.py before the first write: the server's version and the privileges, each named when missing
    errors.py    client exceptions and refused items as CbirErrors naming cluster, index and action
    client.py    the AsyncElasticsearch client from CBIR_ES_*: URL, credentials, timeouts

mapping.py, queries.py and errors.py are pure (dicts in, dicts or errors out); the others talk to the cluster.
"""

from services.common.stores.elasticsearch.mapping import INDEX_OPTIONS, versioned_index
from services.common.stores.elasticsearch.store import ElasticsearchStore

__all__ = ["INDEX_OPTIONS", "ElasticsearchStore", "versioned_index"]
