"""Stand-ins for the parts a test does not exercise: an embedding service without a model."""

from __future__ import annotations

import numpy as np

from services.common.embedding import EmbedderInfo, Embedding


class FixedEmbedder:
    """An `EmbeddingService` without a model: every image gets the same unit vector."""

    warming_up = False

    def __init__(self, *, dims: int = 26, model_version: str = "fixed-model") -> None:
        self.dims, self.model_version = dims, model_version
        self.vector = np.eye(dims, dtype=np.float32)[0]

    async def info(self) -> EmbedderInfo:
        return EmbedderInfo(model_version=self.model_version, dims=self.dims, classes=["cat", "dog"], metadata={})

    async def embed(self, images: np.ndarray, *, purpose: str = "query") -> list[Embedding]:
        return [Embedding(vector=self.vector, label="cat", confidence=1.0) for _ in images]

    async def close(self) -> None:
        pass
