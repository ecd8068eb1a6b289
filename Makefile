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

.PHONY: setup demo test compat compat-run lint unit bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# What CI runs: the whole suite on SALT_VERSION and the compatibility tiers, in four pytest
# sessions side by side (scripts/side-by-side.sh prints each session's output whole when all
# have ended): the rest of the suite; the packages that start topologies of their own (the
# fault scenarios, whose time is mostly outages waited out; two top masters; relays on the
# syndic masters); one tier per older Salt. Each session starts its own servers on free
# loopback ports. Run one after another they took 30.8 min (2026-12-02: setup and lint 0.7,
# the first two side by side 17.2, the tiers side by side 12.0, each tier 7.6 alone).
COMPAT_RUN := $(filter-out $(SALT_VERSION),$(COMPAT_SALT))
OWN_TOPOLOGY := tests/integration/faults tests/integration/multimaster tests/integration/scaleout
test: lint
	@for v in $(COMPAT_RUN); do \
	  $(MAKE) --no-print-directory setup SALT_VERSION=$$v VENV=.venv-$$v || exit 1; done
	@bash scripts/side-by-side.sh \
	  suite "$(PY) -m pytest tests -q $(addprefix --ignore=,$(OWN_TOPOLOGY))" \
	  own-topology "$(PY) -m pytest $(OWN_TOPOLOGY) -q" \
	  $(foreach v,$(COMPAT_RUN),compat-$(v) \
	    "$(MAKE) --no-print-directory compat-run SALT_VERSION=$(v) VENV=.venv-$(v)")

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
