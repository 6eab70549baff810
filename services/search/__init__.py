"""The search gateway: upload an image, get the most similar indexed images as JSON."""
