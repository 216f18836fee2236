# The two entry points a new user needs (see README): `make benchmark` and `make test`.
# Both create the virtual environment under .venv from constraints.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/default
WORKERS ?= 2

.PHONY: benchmark test lint env clean-env

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,notebooks,postgres,ray]"
	touch $(STAMP)

env: $(STAMP)

benchmark: $(STAMP)
	$(BIN)/pertbench benchmark --default --out $(OUT) --resume --workers $(WORKERS)

test: $(STAMP)
	bash scripts/run_tests.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean-env:
	rm -rf $(VENV)
