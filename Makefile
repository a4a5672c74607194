# detkit: `make demo` and `make test` create .venv when missing and install the project (with its dev
# extras) under constraints.txt; the install is skipped while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# The demo, for now: the generated shapes dataset (made once), its statistics, what the model will see,
# and the backbone table. The detection issue replaces this with train -> eval -> predict.
demo: $(STAMP)
	@test -f data/shapes/annotations/instances_val.json || $(VENV)/bin/detkit data make-shapes data/shapes
	$(VENV)/bin/detkit data stats configs/_base_/data/shapes.yaml --split train
	$(VENV)/bin/detkit data show configs/_base_/data/shapes.yaml --out runs/demo/data-show -n 8
	$(VENV)/bin/detkit backbones

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check detkit tests tools benchmarks

clean-venv:
	rm -rf $(VENV)
