"""cbir: content-based image retrieval services (embedder → indexer → store → search)."""
