# Two commands on a fresh machine:
#   make run    trains PPO on CartPole locally (configs/cartpole_ppo.yaml)
#   make test   runs the test suite
# Each creates (or reuses) a virtual environment in $(VENV) and installs what it needs.
# TORCH_SPEC picks the torch build: CI sets TORCH_SPEC=torch==2.13.0 to take a CPU build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
CONFIG ?= configs/cartpole_ppo.yaml
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: run test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test,ray]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/srl run $(CONFIG)

test: $(VENV)/.installed-ray
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs
