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

# Runs what exists today: the embedded SQLite database, migrated to the current schema, and the
# frame inspection tool. The server and the bridge are not built yet (README, "Status").
run: venv
	@mkdir -p $(DATA)
	@$(VENV)/bin/kalandra db upgrade --database sqlite:///$(DATA)/kalandra.db
	@echo
	@echo "Decoding a reference Hello frame with the frame inspector:"
	@$(VENV)/bin/kalandra frame decode \
		53554e44010000010000000000000018$$(printf '0%.0s' {1..224})a26776657273696f6e016c6361706162696c697469657380
	@echo
	@echo "Kalandra Bridge $$($(PY) -c 'import kalandra_core; print(kalandra_core.__version__)'): what runs today"
	@echo "  database (SQLite, embedded default): $(DATA)/kalandra.db, schema at head"
	@echo "  inspect a frame:  $(VENV)/bin/kalandra frame decode HEX      (or - for stdin)"
	@echo "  build a frame:    $(VENV)/bin/kalandra frame encode JSON     (the shape decode prints)"
	@echo "  schema:           $(VENV)/bin/kalandra db current --database sqlite:///$(DATA)/kalandra.db"
	@echo "  The homeserver, native client and Matrix bridge are not built yet; nothing is left running."

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	@bash tests/ensure_postgres.sh
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test: lint unit

bench: venv
	$(PY) -m bench

bench-full: venv
	$(PY) -m bench --full

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache .mypy_cache .ruff_cache .hypothesis
