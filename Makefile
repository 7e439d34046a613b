# memfit: `make demo` fits the demo model into a budget; `make test` runs the linter and the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
BUDGET ?= 30%

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[test]'

demo: install
	$(BIN)/memfit optimize --model demo --budget $(BUDGET) --out memfit-out

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q --durations=40; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) memfit-out .pytest_cache .ruff_cache
