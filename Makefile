# The two quick-start commands (README): `make smoke` and `make test`.
# Both create .venv (pinned dependencies from pyproject.toml) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=

.PHONY: smoke paper test test-e2e test-docker test-vllm-image test-slurm images gpu-wheels status compare smoke-reference

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# the whole pipeline on the CPU preset: cells -> tables -> figures
# (workflow.lib.lock: first remove Snakemake's lock if a killed run left it and none runs here)
smoke: $(VENV)/.installed
	$(BIN)/python -m workflow.lib.lock
	$(BIN)/snakemake --cores all --config preset=smoke runner=local $(CONFIG)

# the paper's experiments (GPU host)
paper: $(VENV)/.installed
	$(BIN)/python -m workflow.lib.lock
	$(BIN)/snakemake --cores all --config preset=paper $(CONFIG)

# the fast tier (16 min on 2 cores): unit tests, dry-runs, bad input, preflight, and the rerun checks on a
# 13-cell smoke subset (no-op, forced cell, deleted / corrupt results, status, a killed run resumed)
test: $(VENV)/.installed
	$(BIN)/pytest -m "not e2e"

# the end-to-end tier (22 min on 2 cores; .ci/run runs it after make test): the whole smoke preset
# (every cell, tables, figures, the trained model, claims, the report in Chromium) and the docker tests
test-e2e: $(VENV)/.installed
	$(BIN)/pytest -m e2e

# the docker tests alone; they fail (instead of skipping) without a Docker engine
test-docker: $(VENV)/.installed
	KVSTUDY_REQUIRE_DOCKER=1 $(BIN)/pytest tests/docker

# separate CI job: the vLLM image (CPU variant) builds from its lock and runs a vLLM cell (~10 min, ~4 GB)
test-vllm-image: $(VENV)/.installed
	KVSTUDY_REQUIRE_DOCKER=1 KVSTUDY_TEST_VLLM_IMAGE=1 $(BIN)/pytest tests/docker/test_vllm_image.py

# separate CI job: the pipeline through SLURM on a one-node cluster the test starts on localhost
# (tests/slurm; needs slurmctld slurmd slurm-client munge; 9-12 min on 2 cores shared with other work)
test-slurm: $(VENV)/.installed
	KVSTUDY_TEST_SLURM=1 KVSTUDY_REQUIRE_SLURM=1 $(BIN)/pytest tests/slurm

# every framework image of a preset (runner=docker), without running cells
images: $(VENV)/.installed
	$(BIN)/snakemake --cores all --config preset=$(PRESET) runner=docker $(CONFIG) -- $(addprefix results/images/,$(addsuffix .iid,engine hf h2o infinigen vllm))

# wheels of snakemake and its dependencies for the offline 2-GPU check (benchmarks/gpu_two_cells.sh)
gpu-wheels:
	benchmarks/gpu_wheels.sh

# cells that did not measure, with the command to rerun each (PRESET=smoke|paper)
PRESET ?= smoke
status: $(VENV)/.installed
	$(BIN)/python -m workflow.lib.lock
	$(BIN)/python -m workflow.lib.status --config preset=$(PRESET) $(if $(filter smoke,$(PRESET)),runner=local) $(CONFIG)

# this run vs a reference run, cell by cell: this / reference per headline metric, flagged outside tolerance
REF ?=
compare: $(VENV)/.installed
	@test -n "$(REF)" || { echo "make compare: name the reference run, e.g. REF=$$(ls -d results/reference/*/ | head -1)" >&2; exit 2; }
	$(BIN)/python -m workflow.lib.compare --ref $(REF) --out results/compare/$(notdir $(patsubst %/,%,$(REF))).csv

# regenerate the shipped smoke reference run (results/reference/smoke-<date>/): the smoke run, timed, then its
# cells, tables, claims, decision guide and report copied there
smoke-reference: $(VENV)/.installed
	start=$$(date +%s); $(MAKE) smoke && $(BIN)/python -m workflow.lib.reference --preset smoke --wall-s $$(( $$(date +%s) - start ))
