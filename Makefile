# Two entry points (see README): `make demo` runs the main job on the demo cohort, `make test`
# runs the test suite. Both create .venv/ in the repo root on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint results venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/train.py experiment=clinical_pathomics

# Every experiment on the demo cohort at two sizes (83 patients, seed 0; 250 patients, seed 7),
# and the deep CT experiments on the complete cases (complete_cases=true: the patients and splits
# of their classical counterparts), then one table (multirun/results/results.md). A failed job
# does not stop the rest.
EXPERIMENTS ?= clinical,pathomics,clinical_pathomics,radiomics,clinical_radiomics,multimodal,seed/clinical,seed/pathomics,seed/clinical_pathomics,seed/radiomics,seed/clinical_radiomics,seed/embeddings
results: $(STAMP)
	-$(PY) scripts/train.py -m experiment=$(EXPERIMENTS) report=false hydra.sweep.dir=multirun/results/demo83
	-$(PY) scripts/train.py -m experiment=$(EXPERIMENTS) report=false data.demo.n_patients=250 data.demo.seed=7 hydra.sweep.dir=multirun/results/demo250
	-$(PY) scripts/train.py -m experiment=clinical_radiomics,multimodal complete_cases=true report=false hydra.sweep.dir=multirun/results/demo83cc
	$(PY) scripts/results_table.py multirun/results/demo83 multirun/results/demo250 multirun/results/demo83cc

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# ruff with the settings in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun
