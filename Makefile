# Everything starts from a fresh machine: the first target that needs the virtualenv makes it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck unit bench cache-tests clean system-deps

$(STAMP): pyproject.toml
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
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

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
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# The public HTTP caching test suite (npm http-cache-tests) against PIBL, memory then disk.
cache-tests: install
	$(BIN)/python scripts/cache_tests.py --list
