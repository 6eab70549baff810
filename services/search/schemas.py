"""Request and response models of the search API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_EXAMPLES = 100  # ids of one POST /search/examples, positive and negative together
MODEL = "vgg16-10c-181913bd0bb3-d64-w2"  # the examples below are real answers of the shipped model (docs/api.md)
HIT = {"id": "08df7e6fb1028ba8d710", "filename": "3195.jpg", "label": "cat", "predicted_label": "cat",
       "score": 1.9999475479125977, "similarity": 0.9997377916492861, "image_url": "/images/08df7e6fb1028ba8d710"}
ANSWER = {"query": {"predicted_label": "cat", "confidence": 0.9154477119445801}, "hits": [HIT],
          "model_version": MODEL, "took_ms": 72.08}


def examples(*values: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(values)})


class QueryPrediction(BaseModel):
    predicted_label: str = Field(description="the model's class for the query image")
    confidence: float = Field(ge=0, le=1, description="softmax probability of that class")


class SearchHit(BaseModel):
    model_config = examples(HIT)

    id: str
    filename: str
    label: str | None = Field(description="the ground-truth label, null when the collection has none")
    predicted_label: str = Field(description="the model's class for the hit, as stored when it was indexed")
    score: float = Field(ge=0, le=2, description="cosine similarity + 1.0 of the whole vectors (the visual part and "
                                                "the weighted one-hot of the predicted class): what ranks the hits")
    similarity: float | None = Field(
        ge=-1, le=1, description="the cosine similarity of the visual parts alone (the PCA embeddings, without the "
                                 "one-hot): how alike the images look, comparable between hits of one class; null "
                                 "only for a query vector with no visual part")
    image_url: str


class SearchResponse(BaseModel):
    model_config = examples(ANSWER)

    query: QueryPrediction | None = Field(
        description="the query image's prediction (the upload's, or the indexed image's as stored); null for a "
                    "query by several examples")
    hits: list[SearchHit] = Field(description="ranked by score, best first; hits offset to offset + k")
    model_version: str = Field(description="the model that embedded the query and every hit")
    took_ms: float


class BatchError(BaseModel):
    status: int = Field(description="the HTTP status this file alone would have got")
    detail: str


class BatchItemError(BaseModel):
    error: BatchError


class BatchSearchResponse(BaseModel):
    model_config = examples({"results": [ANSWER, {"error": {"status": 415, "detail": "README.md: the file is not a "
                                                             "supported image; send one of: JPEG, PNG, GIF, WEBP, "
                                                             "BMP, TIFF"}}]})

    results: list[SearchResponse | BatchItemError] = Field(
        description="one per file, in the order sent: a search response, or the error of that file")


class ExamplesRequest(BaseModel):
    """"More like these, less like those": the query is the normalised mean of the positives' vectors minus
    `beta` times the mean of the negatives' (Rocchio's relevance feedback)."""

    positive: list[str] = Field(min_length=1, max_length=MAX_EXAMPLES, description="ids of images to look like")
    negative: list[str] = Field(default_factory=list, max_length=MAX_EXAMPLES,
                                description="ids of images not to look like")
    beta: float = Field(0.5, ge=0, le=1, description="weight of the negatives")

    model_config = examples({"positive": ["08df7e6fb1028ba8d710", "b097de4ed18b4a5040cc"], "negative": [],
                             "beta": 0.5})


class ImageMeta(BaseModel):
    """An indexed image without its vector."""

    model_config = examples({"id": "08df7e6fb1028ba8d710", "filename": "3195.jpg", "source": "/data/cifar10",
                             "label": "cat", "predicted_label": "cat", "confidence": 0.9130068421363831, "size": 840,
                             "mtime": 1796124199.9495785, "model_version": MODEL,
                             "image_url": "/images/08df7e6fb1028ba8d710"})

    id: str
    filename: str
    source: str = Field(description="`upload`, or the collection root it was indexed from")
    label: str | None
    predicted_label: str
    confidence: float
    size: int = Field(description="bytes of the file when it was embedded")
    mtime: float = Field(description="its modification time then (an upload: when it was added), Unix seconds")
    model_version: str
    image_url: str


class ImageAdded(BaseModel):
    model_config = examples({"id": "135628d08dac85584d93", "filename": "135628d08dac85584d93.jpg", "label": "dog",
                             "predicted_label": "dog", "model_version": MODEL})

    id: str = Field(description="the hash of the uploaded bytes: the same bytes give the same id")
    filename: str = Field(description="the stored file's name (the id and an extension)")
    label: str | None
    predicted_label: str
    model_version: str
    near_duplicate_of: list[str] | None = Field(
        None, description="ids of stored images it is a near duplicate of (GET /duplicates), most similar first; "
                          "null while the collection's signatures are still being computed")


class WatchedFolder(BaseModel):
    """A folder the serving process keeps indexed (`cbir serve --watch DIR`, `CBIR_WATCH`)."""

    folder: str
    state: str = Field(description="starting (before its first reconcile), running, error (the last batch failed; "
                                   "tried again) or stopped")
    batches: int = Field(description="batches of changes indexed so far, the first reconcile included")
    last_batch: dict[str, float | int] | None = Field(
        None, description="the last batch: finished (Unix time), seconds, changes (file events), added, updated, "
                          "removed, retrying (files not decodable yet), documents (in the store)")
    retrying: list[str] = Field(description="files that did not decode yet (still being written?), tried again")
    errors: list[str] = Field(description="the last errors: failed batches, and files given up on as undecodable")


class CollectionResponse(BaseModel):
    model_config = examples({"documents": 50001, "model_version": MODEL, "backend": "faiss", "index": "flat",
                             "sources": {"/data/cifar10": 50000, "upload": 1},
                             "labels": {"cat": 5000, "dog": 5001}, "unlabelled": 0, "status": "ready",
                             "indexed": None, "total": None, "writes": True})

    documents: int
    model_version: str | None
    backend: str
    index: str = Field(description="what answers searches, as in /healthz")
    sources: dict[str, int] = Field(description="documents per source: `upload` and each collection root")
    labels: dict[str, int] = Field(description="documents per ground-truth label")
    unlabelled: int = Field(description="documents whose label is null")
    status: str = Field(description="ready, warming_up, indexing, empty or failed (as /healthz)")
    indexed: int | None = Field(None, description="while indexing: images done so far")
    total: int | None = Field(None, description="while indexing: images in the collection")
    writes: bool = Field(description="whether this client may add and delete images without a write key")
    last_indexing_error: str | None = Field(
        None, description="why the last background indexing run failed, when it did (search may have gone on "
                          "with the index as it was: an update or a new model's index that did not finish)")
    watching: list[WatchedFolder] = Field(default_factory=list, description="the folders this process keeps "
                                          "indexed as their files come and go (`cbir serve --watch DIR`)")


class WarmUpProgress(BaseModel):
    compiled: int = Field(description="batch sizes the model is compiled for so far")
    total: int = Field(description="batch sizes it is compiled for in all; `ready` once all are")


class HealthResponse(BaseModel):
    model_config = examples({"status": "ready", "model_version": MODEL, "backend": "faiss", "index": "flat",
                             "documents": 50000, "warm_up": {"compiled": 6, "total": 6}})

    status: str
    model_version: str
    backend: str
    index: str = Field(description="what answers searches: flat (exact), hnsw, or flat while the hnsw graph is "
                                   "built (FAISS); exact or knn (Elasticsearch)")
    documents: int
    warm_up: WarmUpProgress | None = Field(
        None, description="how far the model's compilation is (`warming_up` until `compiled` is `total`); null "
                          "when it is not compiled (CBIR_COMPILE=off, no compiler) or runs in the embedder service")

