# syntax=docker/dockerfile:1
# Two images from one file, installed the same way as the Makefile does it:
#   docker build --target api    -t classlens-api .     (no torch)
#   docker build --target worker -t classlens-worker .  (torch, timm)
# It cannot be built on the development machines (no Docker engine there).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 classlens
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY classlens ./classlens
COPY service ./service
COPY worker ./worker
COPY model_store ./model_store

FROM base AS api
RUN pip install -c constraints.txt ".[api]"
USER classlens
ENV CLASSLENS_DATA_DIR=/home/classlens/data
HEALTHCHECK CMD python -c "import model_store.catalog as c; assert c.Catalog.default().names()" || exit 1
CMD ["classlens", "models", "list"]

FROM base AS worker
RUN pip install -c constraints.txt ".[worker]"
USER classlens
ENV CLASSLENS_DATA_DIR=/home/classlens/data
HEALTHCHECK CMD classlens models verify || exit 1
CMD ["classlens", "models", "verify"]
