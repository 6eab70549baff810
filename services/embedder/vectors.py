"""The one vector builder: embedding → PCA → L2 → concatenated with w·one-hot(class) → L2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_VECTOR_DIMS = 4096  # Elasticsearch's dense_vector limit


@dataclass(frozen=True)
class PcaProjection:
    """PCA parameters as plain arrays: `mean` (E,) and `components` (C, E), rows by variance."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def max_dims(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, embeddings: np.ndarray, *, dims: int, seed: int = 0) -> PcaProjection:
        from sklearn.decomposition import PCA

        dims = min(dims, *embeddings.shape)
        pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed)
        pca.fit(embeddings.astype(np.float32))
        # Row-major, as every reader of `components` assumes: scikit-learn's are column-major, and safetensors
        # writes an array's memory as it lies.
        return cls(mean=np.ascontiguousarray(pca.mean_, dtype=np.float32),
                   components=np.ascontiguousarray(pca.components_, dtype=np.float32))


def check_vector_config(*, pca_dims: int, num_classes: int, max_pca_dims: int) -> None:
    if not 1 <= pca_dims <= max_pca_dims:
        raise ValueError(f"pca_dims={pca_dims} is outside 1..{max_pca_dims} (the bundle's PCA)")
    if pca_dims + num_classes > MAX_VECTOR_DIMS:
        raise ValueError(f"pca_dims + classes = {pca_dims + num_classes} exceeds {MAX_VECTOR_DIMS}")


def build_vectors(
    embeddings: np.ndarray,
    predicted: np.ndarray,
    *,
    projection: PcaProjection,
    pca_dims: int,
    onehot_weight: float,
    num_classes: int,
) -> np.ndarray:
    """Fused, unit-length search vectors of shape `(N, pca_dims + num_classes)`.

    The reduced embedding carries visual similarity; the weighted one-hot of the predicted class
    pulls images of the same predicted class together (w > √2 ranks every same-class image
    above every other one).
    """
    check_vector_config(pca_dims=pca_dims, num_classes=num_classes, max_pca_dims=projection.max_dims)
    reduced = (embeddings.astype(np.float32) - projection.mean) @ projection.components[:pca_dims].T
    reduced = _l2_normalise(reduced)
    onehot = np.zeros((len(predicted), num_classes), dtype=np.float32)
    onehot[np.arange(len(predicted)), predicted] = onehot_weight
    return _l2_normalise(np.concatenate([reduced, onehot], axis=1))


def _l2_normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)
