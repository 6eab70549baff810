"""Vector stores: the interface and its two implementations (embedded FAISS, Elasticsearch)."""

from services.common.stores.base import StoreInfo, VectorStore

__all__ = ["StoreInfo", "VectorStore"]
