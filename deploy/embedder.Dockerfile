# The embedder service: the VGG-16 bundle behind POST /embed, on port 8001.
# Build from the repository root (docker compose does): docker build -f deploy/embedder.Dockerfile .
FROM python:3.11-slim

# CPU wheels by default; deploy/compose.gpu.yml points this at PyPI, whose Linux wheels are CUDA builds.
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

# Dependencies first, in their own layers: they change far less often than the code.
COPY deploy/requirements.lock deploy/requirements.lock
RUN pip install -r deploy/requirements.lock
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md ./
COPY services services
RUN pip install --no-deps .

# The model bundle ships in the image; the installed package cannot find it next to itself.
COPY models/vgg16-cifar10 models/vgg16-cifar10
ENV CBIR_MODEL_DIR=/app/models/vgg16-cifar10

RUN useradd --create-home --uid 10001 cbir
USER cbir

EXPOSE 8001
CMD ["cbir", "embedder", "--host", "0.0.0.0", "--port", "8001"]
