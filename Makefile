# The two commands: `make demo` and `make test`. Each target sets itself up on a fresh
# machine (Debian packages, .venv, the project) and is quick the second time.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EDGECAP := $(VENV)/bin/edgecap
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-hil bench lint-units clean

setup:
	@scripts/bootstrap.sh

demo: setup
	@$(PY) -m agent.demo --out $(DEMO_OUT)

test: setup
	@$(PY) -m pytest

test-hil: setup
	@$(PY) -m pytest -m "hil or slow" -p no:cacheprovider

bench: setup
	@$(PY) -m bench

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
