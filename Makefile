# The two commands a newcomer needs: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DATA := .data

.PHONY: run run-native test lint unit bench bench-full venv clean

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11 or newer is needed (found $(PYTHON))" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@# The runtime dependencies at the versions of requirements.lock (without its hashes:
	@# pip cannot hash an editable install); the dev tools as pyproject.toml allows.
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' requirements.lock > $(VENV)/constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# A complete local system on the embedded default, under .data/ (reused by later runs): a
# throwaway Synapse (its own virtualenv), the bridge with the embedded Kalandra server on SQLite,
# a Matrix admin account and two native accounts; prints how to use them. Ctrl-C stops it; a
# bridge that exits by itself is started again (Synapse keeps running; see README.md).
run: venv
	@bash bridge/devstack/install_synapse.sh
	@$(PY) -m bridge.devstack --data $(DATA)

# The Kalandra homeserver alone (no Matrix), with two demo accounts.
run-native: venv
	@$(PY) -m kalandra_core.devrun --data $(DATA)-native

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) tests/code_shape.py

unit: venv
	@bash tests/ensure_postgres.sh
	@bash bridge/devstack/install_synapse.sh
	@bash tests/jsclient/install.sh
	@# Two processes (pytest-xdist), a test file each at a time: the bridge and fault tests
	@# mostly wait on Synapse and restarts, so the run takes about half as long. One
	@# process: `$(PY) -m pytest -q -p no:xdist`.
	@$(PY) -m pytest -q -n 2 --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test: lint unit

bench: venv
	$(PY) -m bench

# The full benchmarks, then the soak (tests/faults/test_bridge_soak.py) for 10 minutes on each
# database; `make test` runs it for 1 minute on SQLite.
bench-full: venv
	$(PY) -m bench --full
	@bash tests/ensure_postgres.sh
	@bash bridge/devstack/install_synapse.sh
	KALANDRA_SOAK_SECONDS=600 $(PY) -m pytest -q -s tests/faults/test_bridge_soak.py

clean:
	rm -rf $(VENV) .venv-synapse $(DATA) .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.import_linter_cache .grimp_cache
