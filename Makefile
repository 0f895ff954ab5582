# StockRx Patches: developer and CI entry points. No venv activation needed: tools run from .venv/bin.
#   make env                 create/refresh .venv (fast no-op when pyproject.toml is unchanged)
#   make test                run the test suite; extra pytest args: make test PYTEST_ARGS='-x -k foo'
#   make lint                ruff + mypy
# CI runs .ci/run, which runs `make test` with STOCKRX_REQUIRE_POSTGRES=1.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := test
.PHONY: env test lint

env:
	@bash scripts/bootstrap.sh

# pytest exit codes: 0 ok, 1 failures, 2 interrupted, 3 internal error, 4 usage error,
# 5 no tests collected. Any non-zero code fails the target; 5 gets an explicit message.
test: env
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): treated as failure" >&2; fi; \
	exit $$rc

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# ---------------------------------------------------------------------------------------------
# Lead: `demo`, `ui` and `bench` targets go here (depend on `env`, use $(PY) / $(VENV)/bin/...),
# and add them to .PHONY.
# ---------------------------------------------------------------------------------------------
