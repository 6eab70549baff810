# The search gateway: POST /search, GET /images/{id} and the web page, on port 8000.
# It embeds through CBIR_EMBEDDER_URL; the bundle and CPU torch are here so that, with the URL
# unset, it can run the model in-process instead.
# Build from the repository root (docker compose does): docker build -f deploy/search.Dockerfile .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch.compile (CBIR_COMPILE=auto) writes C++ kernels for the CPU and needs a compiler to build them;
# without one the model runs uncompiled (docs/performance.md, "Where the goals stand": what that costs).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

COPY deploy/requirements.lock deploy/requirements.lock
RUN pip install -r deploy/requirements.lock
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md ./
COPY services services
RUN pip install --no-deps .

COPY models/vgg16-cifar10 models/vgg16-cifar10
ENV CBIR_MODEL_DIR=/app/models/vgg16-cifar10

# /state: where a named volume mounted there takes its owner from (uploads are written there).
RUN useradd --create-home --uid 10001 cbir && mkdir -p /state && chown cbir /state
USER cbir

EXPOSE 8000
CMD ["cbir", "gateway", "--host", "0.0.0.0", "--port", "8000"]
