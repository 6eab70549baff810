"""The embedder: images → vectors (VGG-16 embedding → PCA → L2 → fused one-hot)."""
