# `make repro`: isolated environment + the whole DVC pipeline on the embedded synthetic data.
# `make test`:  the same environment + the test suite.
VENV ?= .venv
PYTHON ?= python3
# Stage commands in dvc.yaml call `python`: put the environment first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

repro: setup
	dvc repro

test: setup
	python -m pytest -q

bench: setup
	python benchmarks/build_shards_bench.py
	python benchmarks/runtime_bench.py
	python benchmarks/train_bench.py

clean-venv:
	rm -rf $(VENV)
