# et_circuits pipeline. `make all` runs every stage on the model organism and ends with one page,
# $(FIGURES)/report.html; `make test` runs the lint, the import contracts and every test;
# `make test-fast` the unit tests alone.
# Variables: MODELS (space-separated registry names; the first is the base), REGISTRY (a TOML
# file naming your own models), RESULTS (result files), FIGURES (figures and the report page),
# PYTHON (for the venv), CLI (the stages' command), LAUNCH (what starts the stages that shard
# their work: circuit, dcm, cmap, knockout; e.g. LAUNCH=".venv/bin/torchrun --nproc_per_node 8").
MODELS  ?= organism-llama organism-vicuna organism-goat organism-float
RESULTS ?= results
FIGURES ?= $(or $(ET_CIRCUITS_FIGURES),figures)
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CLI     := $(PY) -m et_circuits
SHARDED  = $(if $(LAUNCH),$(LAUNCH) -m -- et_circuits,$(CLI))
BASE    := $(firstword $(MODELS))
ifdef REGISTRY
export ET_CIRCUITS_REGISTRY := $(abspath $(REGISTRY))
endif
FINETUNED := $(filter-out $(BASE),$(MODELS))

# The CLI's defaults are the paper's. For the organism, DCM uses fewer pairs so that `make all`
# fits in minutes on 2 CPU cores. Override CIRCUIT_ARGS / DCM_ARGS / CMAP_ARGS / KNOCKOUT_ARGS
# to change a stage's settings.
ORGANISM := $(filter organism-%,$(BASE))
CIRCUIT_ARGS ?=
DCM_ARGS ?= $(if $(ORGANISM),--n-train 320 --n-eval 160 --n-test 320,)
CMAP_ARGS ?=
KNOCKOUT_ARGS ?=

# Every stage's outputs are file targets, so make reruns a stage only when what it reads changed
# (a finished `make all` followed by `make cmap` or `make all` runs nothing). A command that
# writes several files is one grouped rule (&:). Figures that a stage writes only in some
# settings (completeness, dcm_extra, cmap_input) are not targets, so that they never force a rerun.
# Each model's circuit at the paper's positions (RESULTS/<model>/) and at the positions a
# sweep discovered (RESULTS/<model>/discovered/).
CIRCUITS := $(MODELS:%=$(RESULTS)/%/circuit.json) $(MODELS:%=$(RESULTS)/%/discovered/circuit.json)
DCMS     := $(MODELS:%=$(RESULTS)/%/dcm.json)
TABLE1   := $(RESULTS)/table1.csv $(RESULTS)/table1.md $(RESULTS)/overlap.csv
CIRCUIT_FIGURES := $(MODELS:%=$(FIGURES)/%_path_patching.json) $(MODELS:%=$(FIGURES)/%_discovered_path_patching.json) \
  $(MODELS:%=$(FIGURES)/%_sweep.json) $(FIGURES)/$(BASE)_circuit.json $(FIGURES)/$(BASE)_discovered_circuit.json \
  $(FIGURES)/table1.json
DCM_FIGURES := $(RESULTS)/dcm.csv $(FIGURES)/dcm.json $(FIGURES)/dcm_discovered.json
CMAP     := $(RESULTS)/cmap.csv $(FIGURES)/cmap.json $(FIGURES)/cmap_discovered.json
KNOCKOUT := $(RESULTS)/knockout.csv $(FIGURES)/knockout.json
REPORT   := $(FIGURES)/report.html

.PHONY: all install test test-fast lint circuit dcm cmap knockout figures report bench gpu-check organism clean
.DELETE_ON_ERROR:

all: circuit dcm cmap knockout report
circuit: $(CIRCUITS) $(TABLE1) $(CIRCUIT_FIGURES)
dcm: $(DCMS) $(DCM_FIGURES)
cmap: $(CMAP)
knockout: $(KNOCKOUT)
figures: $(CIRCUIT_FIGURES)  # the circuit stage's figures; every stage draws its own
report: $(REPORT)

# Install once per change of pyproject.toml. The CPU build of torch is pinned first where the
# local wheel exists, so the loose torch requirement never pulls CUDA packages. PNG export of
# figures (kaleido) needs a Chrome/Chromium; as root on Debian we install it, else HTML only.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 || echo "torch==2.13.0 not available here; using the resolver's torch"
	$(PY) -m pip install -q -e ".[test]"
	@command -v chromium >/dev/null || command -v google-chrome >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  echo "no Chrome/Chromium found: figures will be written as HTML only"
	touch $@

# The suite runs on two workers (pytest-xdist). Tests that start processes of their own are in
# two xdist groups of about equal cost (`--dist loadgroup`), so at most two run at once.
PYTEST := $(PY) -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadgroup

test: lint $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) tests/unit

# ruff (lint and format) and the import-linter contracts of pyproject.toml (layers, methods).
lint: $(STAMP)
	$(VENV)/bin/ruff check et_circuits tests benchmarks
	$(VENV)/bin/ruff format --check et_circuits tests benchmarks
	$(VENV)/bin/lint-imports

# The install is order-only (|): it must exist before a stage runs, but reinstalling after a
# change of pyproject.toml does not make finished stages stale.
# One process per stage for all models (each loaded once): starting Python with torch and
# TransformerLens costs seconds, which would be most of an organism stage (and torchrun's start
# as much again). Where the circuits are due, Table 1 and the stage's figures run in the same
# process after them (--then), and TABLE1_DONE tells Table 1's own rule, which make still visits,
# that nothing is left to do; alone (a newer circuit, a missing figure) that rule runs table1.
TABLE1_CMD = table1 --base $(BASE) --models $(MODELS) --results $(RESULTS) --figures $(FIGURES)
$(CIRCUITS) &: | $(STAMP)
	$(eval TABLE1_DONE := yes)
	$(SHARDED) circuit --models $(MODELS) --results $(RESULTS) $(CIRCUIT_ARGS) --then $(TABLE1_CMD)

$(TABLE1) $(CIRCUIT_FIGURES) &: $(CIRCUITS) | $(STAMP)
	$(if $(TABLE1_DONE),@:,$(SHARDED) $(TABLE1_CMD))

# DCM draws its figures in the same process (--figures): one start less.
# A rerun of DCM reuses every finished mask training (dcm_runs.json), so a changed circuit
# retrains only the masks that depend on it (and a missing figure costs no training).
$(DCMS) $(DCM_FIGURES) &: $(CIRCUITS) | $(STAMP)
	$(SHARDED) dcm --models $(MODELS) --base $(BASE) --results $(RESULTS) --figures $(FIGURES) $(DCM_ARGS)

# CMAP reads each fine-tuned model's circuit.json and dcm.json.
$(CMAP) &: $(FINETUNED:%=$(RESULTS)/%/circuit.json) $(FINETUNED:%=$(RESULTS)/%/discovered/circuit.json) \
  $(FINETUNED:%=$(RESULTS)/%/dcm.json) | $(STAMP)
	$(SHARDED) cmap --base $(BASE) --models $(FINETUNED) --results $(RESULTS) --figures $(FIGURES) $(CMAP_ARGS)

# Knockout also blocks the last token's reads at the base's discovered positions.
$(KNOCKOUT) &: $(RESULTS)/$(BASE)/discovered/circuit.json | $(STAMP)
	$(SHARDED) knockout --models $(BASE) --results $(RESULTS) --figures $(FIGURES) $(KNOCKOUT_ARGS)

$(REPORT): $(TABLE1) $(CIRCUIT_FIGURES) $(DCM_FIGURES) $(CMAP) $(KNOCKOUT) | $(STAMP)
	$(CLI) report --models $(MODELS) --results $(RESULTS) --figures $(FIGURES)

# Speed on this machine: path patching fast vs reference and the position sweep on the organism,
# the same at LLaMA-7B head geometry on CPU (median of three runs), DCM batching, the stages of
# `make all`, screening with attribution (exact path patching of the senders attribution ranks
# first; the attribution sweep), and each stage as one process against 2 torchrun ranks
# (bench_scaling.py). Each prints its ratio on its last line. A GPU runs bench_7b_geometry.py and
# bench_attribution.py at full width (--gpu).
bench: $(STAMP)
	$(PY) benchmarks/bench_path_patching.py
	$(PY) benchmarks/bench_7b_geometry.py --cpu --runs 3
	$(PY) benchmarks/bench_attribution.py
	$(PY) benchmarks/bench_dcm.py --results $(RESULTS)
	$(PY) benchmarks/bench_make_all.py
	$(PY) benchmarks/bench_scaling.py

# The first GPU run, prepared (benchmarks/gpu_check.py): the CUDA path checked against the CPU on the
# organism (path patching, Table 1, DCM, CMAP), then LLaMA-7B head geometry measured at full width
# (bf16, random weights built on the GPU: forward, fast vs reference path patching, a DCM epoch, a
# CMAP pass, peak memory), all within GPU_CHECK_BUDGET seconds. Every number goes to
# benchmarks/results/gpu_check_<card>.json, rewritten after every part; the summary table is
# printed. GPU_CHECK_ARGS adds options (e.g. --parts geometry). With a Python of your own that has
# a CUDA torch: `make gpu-check PY=python3` (no venv is made then). The CPU rehearsal:
# `python benchmarks/gpu_check.py --device cpu --small`.
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_ARGS ?=
gpu-check: $(if $(filter $(VENV)/%,$(PY)),$(STAMP))
	$(PY) benchmarks/gpu_check.py --device cuda --budget $(GPU_CHECK_BUDGET) --out benchmarks/results/ $(GPU_CHECK_ARGS)

organism: $(STAMP)
	$(PY) -m et_circuits.tasks.entity_tracking.organism.train

clean:
	rm -rf $(RESULTS)
