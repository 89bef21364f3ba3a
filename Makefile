# Everything starts from a fresh machine: the first target that needs the virtualenv makes it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck unit bench cache-tests clean system-deps

# The install compiles the hot-path modules in place (mypyc, about a minute; setup.py), so it
# is redone whenever a source changes. PIBL_COMPILE=0 make ... installs pure Python instead.
SOURCES := $(shell find src/pibl -name '*.py')

$(STAMP): pyproject.toml setup.py $(SOURCES)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "PIBL needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		echo "python3 -m venv failed; installing Debian's python3-venv"; \
		apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/pibl demo

lint: install
	$(BIN)/ruff check setup.py src tests bench
	$(BIN)/ruff format --check setup.py src tests bench

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest tests/unit -q

# Programs the tests start for real: headless Chromium for the dashboard test. Installed with
# apt-get when missing (as root, like CI); elsewhere install them once by hand.
system-deps:
	@command -v chromium >/dev/null || { \
		echo "installing Debian's chromium for the dashboard test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: lint typecheck system-deps
	@command -v redis-server >/dev/null || { \
		echo "installing Debian's redis-server for the redis cache tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	find src -name '*.so' -delete

# PIBL against nginx and HAProxy: installs wrk, nginx, haproxy (apt-get) and the bench extra.
# About 15 min; shorter: make bench BENCH_DURATION=2 BENCH_ROUNDS=1. Profile: BENCH_ARGS=--profile
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The public HTTP caching test suite (npm http-cache-tests) against PIBL, memory then disk.
cache-tests: install
	$(BIN)/python scripts/cache_tests.py --list
