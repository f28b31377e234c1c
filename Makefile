# One virtual environment per checkout; every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
GENREC := $(VENV)/bin/genrec
PRESET ?= full
BUNDLE ?= $(if $(filter full,$(PRESET)),bundles/ml-100k,bundles/ml-100k-$(PRESET))
PIP_ARGS ?=

.PHONY: install demo serve build eval test lint clean deploy-tools test-deploy images

VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_ARGS) -e '.[cpu,dev]'
	# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch build and break
	# `transformers` imports; nothing here needs them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

# The main job: fetch ML-100K, build + evaluate a bundle (once), publish user embeddings to
# Redis, and serve it (REST on :8000, gRPC on :50051). PRESET=tiny builds in seconds, into
# bundles/ml-100k-tiny (`make serve PRESET=tiny` serves it again).
demo: install
	$(GENREC) demo --bundle $(BUNDLE) --preset $(PRESET)

serve: install
	$(GENREC) publish-embeddings $(BUNDLE)
	$(GENREC) serve --bundle $(BUNDLE)

build: install
	$(GENREC) build --dataset ml-100k --preset $(PRESET) --out $(BUNDLE)

eval: install
	$(GENREC) eval $(BUNDLE)

lint: install
	$(VENV)/bin/ruff check model_store service loadtest tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

deploy-tools:
	bash deploy/tools.sh

# Dockerfile, chart, dashboard and alert checks only (no cluster, no Docker daemon).
test-deploy: install
	$(PY) -m pytest -q tests/test_deploy.py

images:
	docker build --target cpu -t genrec:$(VERSION)-cpu .
	docker build --target gpu -t genrec:$(VERSION)-gpu .

clean:
	rm -rf $(VENV) bundles .pytest_cache .mypy_cache .ruff_cache .cache/tools
