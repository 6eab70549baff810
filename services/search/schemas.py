"""Request and response models of the search API."""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_EXAMPLES = 100  # ids of one POST /search/examples, positive and negative together


class QueryPrediction(BaseModel):
    predicted_label: str = Field(description="the model's class for the query image")
    confidence: float = Field(ge=0, le=1, description="softmax probability of that class")


class SearchHit(BaseModel):
    id: str
    filename: str
    label: str | None = Field(description="the ground-truth label, null when the collection has none")
    predicted_label: str = Field(description="the model's class for the hit, as stored when it was indexed")
    score: float = Field(ge=0, le=2, description="cosine similarity + 1.0")
    image_url: str


class SearchResponse(BaseModel):
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
    results: list[SearchResponse | BatchItemError] = Field(
        description="one per file, in the order sent: a search response, or the error of that file")


class ExamplesRequest(BaseModel):
    """"More like these, less like those": the query is the normalised mean of the positives' vectors minus
    `beta` times the mean of the negatives' (Rocchio's relevance feedback)."""

    positive: list[str] = Field(min_length=1, max_length=MAX_EXAMPLES, description="ids of images to look like")
    negative: list[str] = Field(default_factory=list, max_length=MAX_EXAMPLES,
                                description="ids of images not to look like")
    beta: float = Field(0.5, ge=0, le=1, description="weight of the negatives")

    model_config = {"json_schema_extra": {"examples": [{"positive": ["731880588693fe375d2b"], "negative": [],
                                                         "beta": 0.5}]}}


class ImageMeta(BaseModel):
    """An indexed image without its vector."""

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
    id: str = Field(description="the hash of the uploaded bytes: the same bytes give the same id")
    filename: str = Field(description="the stored file's name (the id and an extension)")
    label: str | None
    predicted_label: str
    model_version: str


class CollectionResponse(BaseModel):
    documents: int
    model_version: str | None
    backend: str
    sources: dict[str, int] = Field(description="documents per source: `upload` and each collection root")
    labels: dict[str, int] = Field(description="documents per ground-truth label")
    unlabelled: int = Field(description="documents whose label is null")
    status: str = Field(description="ready, warming_up, indexing, empty or failed (as /healthz)")
    indexed: int | None = Field(None, description="while indexing: images done so far")
    total: int | None = Field(None, description="while indexing: images in the collection")
    writes: bool = Field(description="whether this client may add and delete images without a write key")


class HealthResponse(BaseModel):
    status: str
    model_version: str
    backend: str
    documents: int

