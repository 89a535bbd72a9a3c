# Two commands matter on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(PY) tools/stack.py

.PHONY: install run test unit lint stack stack-down stack-status bench soak screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

## Start the local stack (Kafka, PostgreSQL, SMTP sink); harmless when it already runs.
stack: install
	$(STACK) up

stack-down:
	@if [ -x $(PY) ]; then $(STACK) down; else echo "no virtualenv: nothing to stop"; fi

stack-status: install
	$(STACK) status

## Stack + migrations + daemon in the foreground; Ctrl-C stops it cleanly.
run: stack
	$(VENV)/bin/dispatcher run

## The whole test suite against the real services of the local stack.
test: install
	DISPATCHER_STACK_PG_FAST=1 $(STACK) up
	$(PY) -m pytest $(PYTEST_ARGS)

## The unit tests alone: pure logic, no service needed (the stack may be down); seconds.
unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## The portal's screenshots in docs/portal/ (docs/portal.md), taken by its browser tests.
screenshots: install
	DISPATCHER_STACK_PG_FAST=1 $(STACK) up
	PORTAL_SCREENSHOTS=docs/portal $(PY) -m pytest tests/integration/test_portal.py $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: stack
	$(PY) bench/run.py $(BENCH_ARGS)

## A bounded soak under a mixed load (bench/soak.py): SOAK_MINUTES (10), SOAK_ARGS=--help.
SOAK_MINUTES ?= 10
soak: stack
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean: stack-down
	rm -rf .stack $(VENV) .mypy_cache .ruff_cache .pytest_cache
