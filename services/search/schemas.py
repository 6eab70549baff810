"""Request and response models of the search API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class QueryPrediction(BaseModel):
    predicted_label: str = Field(description="the model's class for the uploaded image")
    confidence: float = Field(ge=0, le=1, description="softmax probability of that class")


class SearchHit(BaseModel):
    id: str
    filename: str
    label: str
    score: float = Field(ge=0, le=2, description="cosine similarity + 1.0")
    image_url: str


class SearchResponse(BaseModel):
    query: QueryPrediction
    hits: list[SearchHit] = Field(description="ranked by score, best first")
    took_ms: float


class HealthResponse(BaseModel):
    status: str
    model_version: str
    backend: str
    documents: int
