"""The indexer: streams an image collection through the embedder into a store."""
