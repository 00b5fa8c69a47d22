# make demo: set up .venv and run the embedded default job (bootstrap tiny models, distil on CPU, evaluate).
# make test: set up .venv and run the test suite.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.opd-installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh auto $(VENV)
	touch $@

demo: setup
	$(BIN)/opd demo

test: setup
	$(BIN)/ruff check opd tests benchmarks examples
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check opd tests benchmarks examples

clean:
	rm -rf runs models .pytest_cache
