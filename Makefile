# Two commands for a fresh machine (see README):  make repro   and   make test
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export UNSLOTH_DISABLE_STATISTICS := 1

.PHONY: setup repro test test-fast lint serve mutation
setup: $(VENV)/.installed

# torch==2.13.0 first: on the CPU machines it is a local CPU build (an unpinned torch would pull GBs
# of CUDA build); on a GPU box PyPI's 2.13.0 is the CUDA build. llama-cpp-python compiles once
# (~7 min on 2 cores) and pip caches the wheel.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

repro: setup
	dvc repro

test: setup
	python -m pytest -m "not gpu" -q -p no:cacheprovider

test-fast: setup
	python -m pytest -m "not gpu and not integration and not reliability" -q

# An OpenAI-compatible server on the exported q4_k_m GGUF, http://127.0.0.1:8000/v1 (kmed/serve.py); its
# flags through SERVE_ARGS, e.g. make serve SERVE_ARGS="--host 0.0.0.0 --max-queue 16" (needs KMED_SERVE_API_KEY).
serve: setup
	python -m kmed.serve $(SERVE_ARGS)

lint: setup
	ruff check kmed stages tests bench

# Not part of `test`: breaks each protection of docs/reliability.md in a copy of the tree and runs the
# test its row lists (about an hour on 2 cores); `python tests/mutation/run.py --only NAME` for one.
mutation: setup
	python tests/mutation/run.py
