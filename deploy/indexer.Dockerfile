# The one-shot indexer: `cbir index` reads the collection, embeds it through the embedder service
# (CBIR_EMBEDDER_URL, required here) and writes the vectors to Elasticsearch, then exits.
# No torch and no model bundle: the model runs in the embedder, so this image stays small.
# Build from the repository root (docker compose does): docker build -f deploy/indexer.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY deploy/requirements.lock deploy/requirements.lock
RUN pip install -r deploy/requirements.lock

COPY pyproject.toml README.md ./
COPY services services
RUN pip install --no-deps .

# /state: where a named volume mounted there takes its owner from (uploads are written there).
RUN useradd --create-home --uid 10001 cbir && mkdir -p /state && chown cbir /state
USER cbir

CMD ["cbir", "index", "--no-progress"]
