# Tributary: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
SALT_VERSION ?= 3007.16
VENV ?= $(if $(filter 3007.16,$(SALT_VERSION)),.venv,.venv-$(SALT_VERSION))
PY := $(VENV)/bin/python
export SALT_VERSION VENV

.PHONY: setup demo test lint unit bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m pytest tests/integration/test_demo.py -m demo -s -q -p no:randomly --timeout 0

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest tests -q

unit: setup
	$(PY) -m pytest tests/unit tests/functional -q

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf .venv .venv-* .pytest_cache .mypy_cache .ruff_cache .run
