# The two commands of the README. Both create .venv when needed and are quick once set up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

BENCHES := bench-mtl bench-transfer bench-continual bench-adapt bench-reuse bench-speed bench-serve

.PHONY: demo test gpu-check $(BENCHES) clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# pip byte-compiles what it installs on one core; compileall does it on every core (the
# few files that are not Python 3.11, test data inside some packages, are skipped as pip
# skips them). Without the bytecode every process would compile torch again on import.
COMPILE := $(BIN)/python -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"

# Re-install only when the package metadata changed (the install is editable).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile torch==2.13.0 -e .
	$(COMPILE)
	touch $@

# One pip run for everything the tests need (a fresh clone's `make test` resolves once).
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile torch==2.13.0 -e ".[dev]"
	$(COMPILE)
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/isomod demo --out runs/demo

# Two workers, a file each at a time (module fixtures are built once per file), one thread each.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Every command for a few steps on CUDA, fp32 and bf16, one line each (scripts/gpu_check.py).
gpu-check: $(VENV)/.installed
	$(BIN)/python scripts/gpu_check.py

# `make bench-mtl` runs `isomod bench mtl --out runs/bench-mtl`, and so on.
$(BENCHES): bench-%: $(VENV)/.installed
	$(BIN)/isomod bench $* --out runs/$@

clean:
	rm -rf runs .pytest_cache
