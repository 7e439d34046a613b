# memfit: `make demo` fits the demo model into a budget; `make test` runs the linter and the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
BUDGET ?= 30%

.PHONY: demo test test-fast lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Bytecode: pip would compile every installed module (half the install; torch alone 13 s) while a
# test run imports a fraction of them. Installing without it and letting the first import of each
# module write its .pyc costs less, and memfit's own modules (an editable install) are compiled once
# instead of in every test process, which PYTHONDONTWRITEBYTECODE=1 in the environment would cause.
unexport PYTHONDONTWRITEBYTECODE
install: $(BIN)/python
	$(PIP) install --quiet --no-compile -c constraints.txt -e '.[test]'
	$(BIN)/python -c "import memfit.cli.main"  # what every process imports, compiled once before workers race

demo: install
	$(BIN)/memfit optimize --model demo --budget $(BUDGET) --out memfit-out

lint: install
	$(BIN)/ruff check src tests benchmarks

# Two pytest workers with one torch thread each (torchrun children inherit it): the tiny-model tests are
# bound by Python overhead, so two workers nearly halve them, while two one-thread matmuls do the work
# of one two-thread matmul on the demo model's tests.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=40

test: lint
	$(PYTEST); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: lint
	$(PYTEST) -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) memfit-out .pytest_cache .ruff_cache
