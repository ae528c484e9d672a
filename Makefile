# nrm: `make run` shows it working, `make test` proves it. Both start with
# `make setup`, which is idempotent.

PYTHON ?= python3
VENV   := $(CURDIR)/.venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nrm-installed

# The C parts (libnrm, nrm-spawner, the PMPI interposers) are built by the
# package's own build, libnrm/CMakeLists.txt through scikit-build-core, as
# `pip install` does for users; build/venv keeps its build tree so that a
# second run rebuilds only what changed. The build tools are installed into
# the venv first so that the install needs no build isolation.
C_SOURCES := $(wildcard libnrm/CMakeLists.txt libnrm/nrm.pc.in libnrm/src/* libnrm/include/* \
	       libnrm/fortran/*)
INSTALL := $(VENV)/bin/pip install -q --no-build-isolation \
	--config-settings=build-dir=$(CURDIR)/build/venv -e '.[test,plot,campaign]'

.PHONY: setup bytecode check-editable check-shared system-deps run daemon test lint check-c bench fuzz clean

setup: system-deps $(STAMP) check-shared

system-deps:
	@sh scripts/system-deps.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip

$(STAMP): $(VENV)/bin/python pyproject.toml $(C_SOURCES)
	$(VENV)/bin/pip install -q 'scikit-build-core>=0.10'
	@v=$$(cmake --version 2>/dev/null | sed -n '1s/[^0-9]*\([0-9]*\)\.\([0-9]*\).*/\1 \2/p'); \
	  set -- $$v; [ "$${1:-0}" -gt 3 ] || { [ "$${1:-0}" -eq 3 ] && [ "$${2:-0}" -ge 15 ]; } \
	  || $(VENV)/bin/pip install -q cmake
	$(INSTALL)
	@touch $@

# A venv copied from another checkout, or a module that became a package since
# the editable install, imports the wrong file: reinstall (scripts/check-editable.py).
setup: check-editable
check-editable: $(STAMP)
	@(cd / && $(PY) $(CURDIR)/scripts/check-editable.py $(CURDIR) 2>/dev/null) || $(INSTALL)

# Byte-compile the checkout: where PYTHONDONTWRITEBYTECODE is set, every
# nrmd, pilot and CLI process would otherwise compile what it imports
# (~0.13 s each here); compileall skips what is up to date.
setup: bytecode
bytecode: $(STAMP)
	@$(PY) -m compileall -q nrm >/dev/null

# nrm installed for one user only is a trap on a shared node: say so.
check-shared: $(STAMP)
	@sh scripts/check-shared-python.sh $(PY)

run: setup
	$(PY) -m nrm.tools.demo

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
	$(PY) benchmarks/load.py
	$(PY) benchmarks/decision_latency.py

# Long fuzzing (issue #7), never part of `make test`: the tests/fuzz
# properties with FUZZ_EXAMPLES inputs each (the live-daemon ones a quarter,
# each a batch), then the atheris (libFuzzer) harness for FUZZ_SECONDS per
# target if atheris installs. Counts go to .hypothesis/fuzz-stats.json*;
# crashing inputs to .hypothesis/atheris/. Durations: README, "Fuzzing".
FUZZ_EXAMPLES ?= 20000
FUZZ_SECONDS  ?= 60
FUZZ_DIR      := $(CURDIR)/.hypothesis

fuzz: setup
	@mkdir -p $(FUZZ_DIR)/atheris && rm -f $(FUZZ_DIR)/fuzz-stats.json.rss
	NRM_FUZZ_LONG=1 NRM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) NRM_FUZZ_STATS=$(FUZZ_DIR)/fuzz-stats.json \
	  $(VENV)/bin/pytest -q -p no:cacheprovider --timeout=0 tests/fuzz
	@$(PY) -c 'import atheris' 2>/dev/null || $(VENV)/bin/pip install -q atheris \
	  || echo "atheris did not install: coverage-guided run skipped"
	@if $(PY) -c 'import atheris' 2>/dev/null; then for t in request downstream seed manifest; do \
	  echo "atheris $$t, $(FUZZ_SECONDS) s:"; \
	  $(PY) tests/fuzz/atheris_harness.py $$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -rss_limit_mb=1024 -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/atheris/ \
	    > $(FUZZ_DIR)/atheris-$$t.log 2>&1; rc=$$?; \
	  grep -E '^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+[[:space:]]+DONE' $(FUZZ_DIR)/atheris-$$t.log; \
	  if [ $$rc != 0 ]; then tail -40 $(FUZZ_DIR)/atheris-$$t.log; exit 1; fi; done; fi

clean:
	$(MAKE) -s -C libnrm clean || true
	rm -rf $(VENV) build *.egg-info
