# detkit: `make demo` and `make test` create .venv when missing and install the project (with its dev
# extras) under constraints.txt; the install is skipped while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test test-slow test-full lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# The demo: train a small Faster R-CNN from scratch on the generated shapes set (made on first use) on the
# CPU, evaluate it (metrics.json, PR curves), and draw its predictions on a few validation images.
DEMO ?= runs/demo
demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/detkit train configs/faster_rcnn/shapes.yaml output_dir=$(DEMO)/train
	$(VENV)/bin/detkit eval $(DEMO)/train
	$(VENV)/bin/detkit predict $(DEMO)/train 'data/shapes/images/val/00000*.jpg' --out $(DEMO)/predict
	@echo "demo outputs: $(DEMO)/train (checkpoints, metrics.json, pr_curves/, logs) and $(DEMO)/predict (drawn images)"

# The fast tier, after every change: every module, without the tests marked slow (wall-clock budgets, DDP,
# subprocess faults, multi-trial studies, every-network sweeps); one pytest worker per core, a test file per worker.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

# The rest of the suite (the tests marked slow): in parallel, then the tests that measure wall-clock time
# (marked serial) alone. CI runs make test, then this.
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not serial" -n $(JOBS) --dist loadfile $(PYTEST_ARGS)
	$(PY) -m pytest -m serial $(PYTEST_ARGS)

# Every test: the fast tier, then the slow one.
test-full: test test-slow

lint: $(STAMP)
	$(VENV)/bin/ruff check detkit tests tools benchmarks

clean-venv:
	rm -rf $(VENV)
