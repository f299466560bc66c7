# The two quick-start commands (README): `make smoke` and `make test`.
# Both create .venv (pinned dependencies from pyproject.toml) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=

.PHONY: smoke paper test status

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# the whole pipeline on the CPU preset: cells -> tables -> figures
smoke: $(VENV)/.installed
	$(BIN)/snakemake --cores all --config preset=smoke $(CONFIG)

# the paper's experiments (GPU host)
paper: $(VENV)/.installed
	$(BIN)/snakemake --cores all --config preset=paper $(CONFIG)

test: $(VENV)/.installed
	$(BIN)/pytest

# cells that did not measure, with the command to rerun each (PRESET=smoke|paper)
PRESET ?= smoke
status: $(VENV)/.installed
	$(BIN)/python -m workflow.lib.status --config preset=$(PRESET)
