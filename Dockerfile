# syntax=docker/dockerfile:1
# Two images from one file, installed the way the Makefile installs (one pip
# command under constraints.txt, which pins torch):
#   docker build --target api    -t classlens-api .     # Flask API, no torch
#   docker build --target worker -t classlens-worker .  # Celery worker: torch, timm, onnxruntime-gpu
# Both need REDIS_URL at run time, with a password and TLS where the network is shared
# (REDIS_URL=rediss://:PASSWORD@redis:6380/0; docs/configuration.md). The development machines have no Docker
# engine, so this file is not built in CI; keep it in step with the Makefile.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CLASSLENS_DATA_DIR=/home/classlens/data \
    CLASSLENS_OPENAPI_PATH=/app/openapi.yaml
RUN useradd --create-home --uid 10001 classlens
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY classlens ./classlens
COPY service ./service
COPY worker ./worker
COPY model_store ./model_store
COPY openapi.yaml ./

FROM base AS api
RUN pip install -c constraints.txt ".[api]"
USER classlens
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez').status != 200)"
CMD ["classlens", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# CUDA torch comes from the index of the image's CUDA version; the pin stays 2.13.0.
RUN pip install -c constraints.txt ".[worker,onnx-gpu]"
USER classlens
# Healthy while a worker's heartbeat is fresh in the store (see classlens/core/heartbeat.py).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD python -c "import sys; from classlens.core.settings import Settings; from classlens.core.store import open_store; from classlens.core.heartbeat import last_beat; sys.exit(last_beat(open_store(Settings())) is None)"
# One worker process per GPU that nvidia-smi lists (or CUDA_VISIBLE_DEVICES names), each on its
# own card, supervised by this one; no GPU: one worker on the CPU, as before (docs/gpu.md).
CMD ["classlens", "worker", "--gpus", "all", "--queues", "gpu,audits,analyses"]
