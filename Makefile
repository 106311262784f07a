# ClassLens: the two commands are `make run` and `make test` (see README.md).
# Both create .venv and install what they need on a machine with only Python.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything from one pip command, under one constraints file that pins torch
# (an unpinned torch pulls a multi-GB CUDA build; docs/troubleshooting.md).
# `onnx` brings onnxruntime (CPU) so that the tests exercise the ONNX explainer graphs;
# on a GPU machine use EXTRAS=api,worker,onnx-gpu,dev instead (never both onnx extras).
EXTRAS ?= api,worker,onnx,dev
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
DEBIAN_PACKAGES := redis-server dataset-fashion-mnist
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: run test test-fast lint format pytest bench bench-gpu gpu-wheels system-deps demo-models samples clean

# Verify the model store, then serve the API with an embedded worker (no Redis
# needed; set REDIS_URL to use Redis and run `classlens worker` separately).
run: $(VENV)/.installed
	$(BIN)/classlens models verify
	$(BIN)/classlens serve

test: system-deps $(VENV)/.installed lint pytest

# Two pytest-xdist processes on two cores: every fixture starts its own servers on free ports.
pytest: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2

# The unit tier: no redis-server, Chromium, dataset or worker processes needed (a few minutes).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not integration and not slow" -n 2

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The lens (ratios to the plain forward pass, peak memory), faithfulness of the maps,
# the service (throughput vs the raw worker, cache hits) and memory over many explanations and images;
# writes bench-results/*.json.
bench: system-deps $(VENV)/.installed
	$(PIP_INSTALL) -e ".[$(EXTRAS),bench]"
	$(BIN)/classlens bench
	$(BIN)/classlens evaluate
	$(BIN)/classlens bench-service
	$(BIN)/classlens bench-memory

# The GPU run (classlens/bench/gpu.py; docs/gpu.md): on a machine whose python3 has a CUDA torch,
# with what that machine lacks installed from $(GPU_WHEELS) (made here by `make gpu-wheels`).
# Writes bench-results/gpu.json; exits non-zero when a check of the CUDA path fails.
GPU_WHEELS := .whl
GPU_SITE := /tmp/classlens-site
bench-gpu:
	@if [ -d $(GPU_WHEELS) ]; then \
		python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 python3 -m classlens.bench.gpu --out bench-results/gpu.json

# Python 3.12 wheels of what a GPU machine's image lacks (pydantic and its parts; this project's timm),
# at the versions installed here: carry $(GPU_WHEELS) with the tree to the GPU machine.
gpu-wheels: $(VENV)/.installed
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m pip freeze | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|timm)==' \
		> $(GPU_WHEELS)/requirements.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[$(EXTRAS)]"
	touch $@

# Debian packages the tests need: installed when we are root with apt-get,
# otherwise a clear message of what to install (and the tests fail loudly).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	test -f $(FASHION_MNIST) || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	{ command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; } || missing="$$missing docker-compose"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
		echo "missing Debian packages:$$missing; install them with: sudo apt-get install$$missing" >&2; exit 1; \
	fi

# Retrain the current versions of the bundled demo models (training times: docs/benchmarks.md).
demo-models: system-deps $(VENV)/.installed
	$(BIN)/python -m classlens.recipes.fashion_mnist

samples: system-deps $(VENV)/.installed
	$(BIN)/python -m classlens.recipes.fashion_mnist --samples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
