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

.PHONY: install dev test lint
install: $(VENV)/.installed

# The listener on an embedded PostgreSQL; OFFLINE=1 draws labelled placeholders without OpenAI.
dev: $(VENV)/.installed
	$(BIN)/image-listener dev $(if $(OFFLINE),--offline)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
