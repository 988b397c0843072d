# The two commands of the README. Both create .venv when needed and are quick once set up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

BENCHES := bench-mtl bench-transfer bench-continual bench-adapt bench-reuse bench-speed

.PHONY: demo test $(BENCHES) clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# Re-install only when the package metadata changed (the install is editable).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 -e .
	touch $@

# One pip run for everything the tests need (a fresh clone's `make test` resolves once).
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 -e ".[dev]"
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/isomod demo --out runs/demo

# Two workers, a file each at a time (module fixtures are built once per file), one thread each.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# `make bench-mtl` runs `isomod bench mtl --out runs/bench-mtl`, and so on.
$(BENCHES): bench-%: $(VENV)/.installed
	$(BIN)/isomod bench $* --out runs/$@

clean:
	rm -rf runs .pytest_cache
