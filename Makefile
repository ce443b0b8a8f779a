# The two commands a newcomer needs: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DATA := .data

.PHONY: run test lint unit bench bench-full venv clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11 or newer is needed (found $(PYTHON))" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Runs the Kalandra homeserver on the embedded default (SQLite under .data/) with two demo
# accounts, and prints how to use it with the `kalandra` client. The Matrix bridge and the
# throwaway Synapse arrive with the bridge (README, "Status").
run: venv
	@$(PY) -m kalandra_core.devrun --data $(DATA)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	@bash tests/ensure_postgres.sh
	@bash tests/matrix/install_synapse.sh
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test: lint unit

bench: venv
	$(PY) -m bench

bench-full: venv
	$(PY) -m bench --full

clean:
	rm -rf $(VENV) .venv-synapse $(DATA) .pytest_cache .mypy_cache .ruff_cache .hypothesis
