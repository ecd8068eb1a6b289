# Tributary: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
# Salt 3008 is the current LTS and the development default; 3007.16 and 3006.29 keep working.
DEFAULT_SALT := 3008.5
SALT_VERSION ?= $(DEFAULT_SALT)
VENV ?= $(if $(filter $(DEFAULT_SALT),$(SALT_VERSION)),.venv,.venv-$(SALT_VERSION))
PY := $(VENV)/bin/python
# `make test` also runs the end-to-end and fault tiers on these (COMPAT_SALT= skips them):
# the faults whose outcome depends on Salt's daemons (syndic, top master and syndic master
# outages, restarts); those of the relay's own logic against Elasticsearch (ES down, mapping
# conflicts, forged batches, ES security) run once, on SALT_VERSION.
COMPAT_SALT ?= 3007.16 3006.29
COMPAT_TESTS := tests/integration/test_end_to_end.py tests/integration/faults/test_faults.py \
  tests/integration/faults/test_alert_restart.py
COMPAT_SKIP := not elasticsearch_down and not mapping_conflict and not malformed_and_forged
export SALT_VERSION VENV

.PHONY: setup demo test test-main compat compat-run lint unit bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# What CI runs: the whole suite on SALT_VERSION, then the compatibility tiers. The packages
# that start topologies of their own (the fault scenarios, whose time is mostly outages waited
# out; two top masters; relays on the syndic masters) run in a second pytest session beside the
# rest of the suite, and the tiers beside each other (scripts/side-by-side.sh prints each
# session's output whole when all have ended).
test: test-main
	@bash scripts/compat.sh $(filter-out $(SALT_VERSION),$(COMPAT_SALT))

OWN_TOPOLOGY := tests/integration/faults tests/integration/multimaster tests/integration/scaleout
test-main: lint
	@bash scripts/side-by-side.sh \
	  suite "$(PY) -m pytest tests -q $(addprefix --ignore=,$(OWN_TOPOLOGY))" \
	  own-topology "$(PY) -m pytest $(OWN_TOPOLOGY) -q"

# One tier alone: `make compat SALT_VERSION=3007.16`.
compat: setup compat-run

compat-run:
	$(PY) -m pytest $(COMPAT_TESTS) -q -k "$(COMPAT_SKIP)"

unit: setup
	$(PY) -m pytest tests/unit tests/functional -q

# `make bench` runs every section; `make bench BENCH="run fleet_state"` runs the ones named
# (each is bench/<section>.py and prints its figures as JSON).
BENCH ?= run fleet_state fleet report nab reaction rules peers scaleout
bench: setup
	@set -e; for s in $(BENCH); do echo "== bench/$$s.py"; $(PY) bench/$$s.py; done

clean:
	rm -rf .venv .venv-* .pytest_cache .mypy_cache .ruff_cache .run
