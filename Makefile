# Every target creates or refreshes .venv itself, so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The exact pin first: it takes the CPU build on disk instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

demo: $(STAMP)
	$(VENV)/bin/rankstream demo

bench: $(STAMP)
	$(VENV)/bin/rankstream bench scoring --json bench-results/scoring.json

clean:
	rm -rf $(VENV) build *.egg-info
