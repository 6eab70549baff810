"""The one-machine store: image documents in an embedded FAISS index saved to one file (`FaissStore`)."""

from services.common.stores.faiss.store import FaissStore

__all__ = ["FaissStore"]
