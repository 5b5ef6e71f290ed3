# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STATE  ?= var

.PHONY: run test lint bench clean image image-boot-test

# Re-install whenever pyproject.toml changes.
$(VENV)/.runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.runtime
	$(BIN)/dicomesh run --state-dir $(STATE)

test: $(VENV)/.test
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check .

bench: $(VENV)/.test
	$(BIN)/python bench/ingest.py

# Appliance images (image/README.md; not run in CI: minutes of downloads and emulation; as
# root). UPDATE_PUBKEY: the Ed25519 public key (PEM) update bundles must be signed with.
# IMAGE_ARCHS=amd64 builds the x86-64 image only.
IMAGE_ARCHS ?= amd64 arm64
IMAGE_OUT   ?= out

image: $(VENV)/.runtime
	test -n "$(UPDATE_PUBKEY)" || { echo "set UPDATE_PUBKEY=path/to/update.pub" >&2; exit 2; }
	for arch in $(IMAGE_ARCHS); do \
		PYTHON=$(BIN)/python image/build.sh $$arch $(UPDATE_PUBKEY) $(IMAGE_OUT) || exit 1; \
	done

# Two boots, about 2.5 minutes under TCG on 2 cores (image/README.md).
image-boot-test:
	image/boot-test.sh $(IMAGE_OUT)/dicomesh-amd64.qcow2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
