# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast install clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lmsmith run recipes/finance-demo.yaml --out runs/finance-demo
	HF_HUB_OFFLINE=1 $(BIN)/lmsmith export runs/finance-demo --to gguf --quant q8_0 --force

# Redis (Debian's redis-server) backs the response-cache tests; the tests start their own instance.
test: $(STAMP)
	bash scripts/ensure_redis.sh
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The inner loop: everything but the tests marked slow (whole recipes, several processes).
test-fast: $(STAMP)
	bash scripts/ensure_redis.sh
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
