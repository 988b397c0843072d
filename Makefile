# The two commands of the README. Both create .venv when needed and are quick once set up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench-mtl bench-transfer bench-continual bench-adapt bench-reuse bench-speed clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# Re-install only when the package metadata changed (the install is editable).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/isomod demo --out runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench-mtl: $(VENV)/.installed
	$(BIN)/isomod bench mtl --out runs/bench-mtl

bench-transfer: $(VENV)/.installed
	$(BIN)/isomod bench transfer --out runs/bench-transfer

bench-continual: $(VENV)/.installed
	$(BIN)/isomod bench continual --out runs/bench-continual

bench-adapt: $(VENV)/.installed
	$(BIN)/isomod bench adapt --out runs/bench-adapt

bench-reuse: $(VENV)/.installed
	$(BIN)/isomod bench reuse --out runs/bench-reuse

bench-speed: $(VENV)/.installed
	$(BIN)/isomod bench speed --out runs/bench-speed

clean:
	rm -rf runs .pytest_cache
