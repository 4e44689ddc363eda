# The two commands: `make demo` and `make test`. Each target sets itself up on a fresh
# machine (Debian packages, .venv, the project) and is quick the second time.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EDGECAP := $(VENV)/bin/edgecap
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-hil bench install install-units clean

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

# On a vehicle, as root: the edgecap user, /opt/edgecap, /etc/edgecap and the units
install: setup
	systemd/install.sh

install-units:
	systemd/install.sh --units-only

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
