# StockRx Patches: developer and CI entry points. No venv activation needed: tools run from .venv/bin.
#   make env                 create/refresh .venv (fast no-op when pyproject.toml is unchanged)
#   make test                run the test suite; extra pytest args: make test PYTEST_ARGS='-x -k foo'
#                            (TEST_WORKERS=0 runs it in one process)
#   make lint                ruff + mypy
# CI runs .ci/run, which runs `make test` with STOCKRX_REQUIRE_POSTGRES=1.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test workers (pytest-xdist). Most slow tests wait on subprocesses (dagster CLI, daemon,
# webserver, PostgreSQL), so three workers keep two cores busy. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3

.DEFAULT_GOAL := test
.PHONY: env test lint

env:
	@bash scripts/bootstrap.sh

# pytest exit codes: 0 ok, 1 failures, 2 interrupted, 3 internal error, 4 usage error,
# 5 no tests collected. Any non-zero code fails the target; 5 gets an explicit message.
test: env
	@rc=0; $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): treated as failure" >&2; fi; \
	exit $$rc

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# ---------------------------------------------------------------------------------------------
# make demo: a demo StockRx SQLite database with 100,000 items, then inventory_price_adjustment
# (+8 %) as a dry run through `dagster job execute`, its impact report, then the real run.
# Everything lives under var/ (gitignored): the database, DAGSTER_HOME (its dagster.yaml from
# `stockrx-patches instance-config`: dagster.yaml plus the run-queue limit of every patch table);
# the demo audit key outside the repository (DEMO_KEY).
DEMO_DIR := var/demo
DEMO_DB := $(abspath $(DEMO_DIR))/stockrx.db
DEMO_ITEMS ?= 100000
# Another database for the demo (its StockRx and data_patch_* tables are dropped and re-made):
#   make demo DEMO_DATABASE_URL='mysql+pymysql://USER:PASSWORD@HOST:3306/stockrx_demo?charset=utf8mb4'
DEMO_DATABASE_URL ?= sqlite:///$(DEMO_DB)
# The demo's audit key lives outside the repository (key files inside it are refused).
DEMO_KEY := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/stockrx-patches/demo-audit.key
DEMO_ENV := STOCKRX_DATABASE_URL='$(DEMO_DATABASE_URL)' \
	STOCKRX_AUDIT_KEY_FILE=$(DEMO_KEY) \
	DAGSTER_HOME=$(abspath $(DEMO_DIR))/dagster_home
# The demo runs whenever you run it, not in a maintenance window: the override is part of the
# plan (dry and real alike) and recorded in the history.
PRICE_JOB := $(VENV)/bin/dagster job execute -m stockrx_patches.definitions -j inventory_price_adjustment \
	-c config/runs/allow_outside_window.yaml

.PHONY: demo
demo: env
	@mkdir -p $(DEMO_DIR)/dagster_home
	$(VENV)/bin/stockrx-patches instance-config > $(DEMO_DIR)/dagster_home/dagster.yaml
	@mkdir -p $(dir $(DEMO_KEY))
	@[ -s $(DEMO_KEY) ] || (umask 077; $(PY) -c "from patch_ops.audit import AuditKeyring; \
	print(AuditKeyring.new_entry('demo'))" > $(DEMO_KEY))
	@echo "stockrx-patches seed-demo --items $(DEMO_ITEMS) --reset  (the URL is not echoed: it may hold a password)"
	@$(VENV)/bin/stockrx-patches seed-demo --database-url '$(DEMO_DATABASE_URL)' --items $(DEMO_ITEMS) --reset
	@echo "== DRY RUN: nothing is committed ================================================="
	@$(DEMO_ENV) $(PRICE_JOB) -c config/runs/inventory_price_adjustment.yaml > $(DEMO_DIR)/dry_run.log 2>&1 \
	  || { tail -40 $(DEMO_DIR)/dry_run.log; exit 1; }
	@$(DEMO_ENV) $(VENV)/bin/stockrx-patches report
	@echo "== REAL RUN ======================================================================="
	@$(DEMO_ENV) $(PRICE_JOB) -c config/runs/inventory_price_adjustment.real.yaml > $(DEMO_DIR)/real_run.log 2>&1 \
	  || { tail -40 $(DEMO_DIR)/real_run.log; exit 1; }
	@$(DEMO_ENV) $(VENV)/bin/stockrx-patches report
	@$(DEMO_ENV) $(VENV)/bin/stockrx-patches history --limit 5
	@echo "(full Dagster logs: $(DEMO_DIR)/dry_run.log, $(DEMO_DIR)/real_run.log)"

# ---------------------------------------------------------------------------------------------
# make ui: the Dagster UI (`dagster dev`: webserver + daemon) on http://127.0.0.1:3000 against the
# demo database var/demo/stockrx.db (seeded with DEMO_ITEMS=100000 items if missing), DAGSTER_HOME
# var/dagster_home; schedules and sensors start stopped (UI_AUTOMATION=on: as coded). A taken
# port exits 1 at once. Another database: make ui UI_DATABASE_URL=...; port: UI_PORT=3001.
.PHONY: ui
ui: env
	@bash scripts/ui.sh

# make bench: inventory_price_adjustment against bare SQL and a naive ORM loop (benchmarks/README.md),
# on a throwaway PostgreSQL. Other sizes/backends: make bench BENCH_ARGS='--sqlite --items 100000'.
BENCH_ARGS ?= --postgres --items 100000
.PHONY: bench
bench: env
	$(PY) -m benchmarks.price_adjustment $(BENCH_ARGS)
