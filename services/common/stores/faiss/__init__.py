"""The one-machine store: image documents in an embedded FAISS index saved to one file (`FaissStore`).

Its parts: table.py (the documents as columns, filters, an exact snapshot), graph.py (the HNSW graph: its build,
its file, approximate search), persistence.py (the `.npz` file and the writer's lock), log.py (the write-ahead log
beside it), store.py (the interface).
"""

from services.common.stores.faiss.store import FaissStore

__all__ = ["FaissStore"]
