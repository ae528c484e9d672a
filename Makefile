# nrm: `make run` shows it working, `make test` proves it. Both start with
# `make setup`, which is idempotent.

PYTHON ?= python3
VENV   := $(CURDIR)/.venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nrm-installed
LIBNRM := $(VENV)/lib/libnrm-pmpi.so

.PHONY: setup system-deps run daemon test lint check-c bench clean

setup: system-deps $(STAMP) $(LIBNRM)

system-deps:
	@sh scripts/system-deps.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

$(LIBNRM): $(VENV)/bin/python $(wildcard libnrm/src/* libnrm/include/* libnrm/fortran/* libnrm/Makefile)
	$(MAKE) -s -C libnrm install PREFIX=$(VENV)

run: setup
	$(PY) -m nrm.demo

daemon: setup
	$(VENV)/bin/nrmd --log-level debug $(NRMD_ARGS)

lint: setup
	$(VENV)/bin/flake8 nrm tests benchmarks examples

check-c: setup
	$(MAKE) -s -C libnrm check

test: setup lint check-c
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/launch.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/sensor_tick.py
	$(PY) benchmarks/interposer.py

clean:
	$(MAKE) -s -C libnrm clean || true
	rm -rf $(VENV) build *.egg-info
