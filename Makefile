# Two commands on a fresh machine:  `make test`  and  `make demo`.
# PYTHON picks the interpreter used to create .venv; TORCH_PIN is the torch pair installed
# first (a CPU-friendly pin that lies on this project's build machines; CUDA users may
# override it, e.g. `make test TORCH_PIN="torch torchvision"`).
PYTHON ?= python3.11
VENV ?= .venv
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# Test-only reference for the Kaldi fbank parity test; --no-deps keeps the torch above.
TORCHAUDIO_REF ?= torchaudio==2.11.0
PYTEST_ARGS ?=
# Arguments of synthetic/demo.py, e.g. `make demo DEMO_ARGS=--quick`.
DEMO_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast gpu-check demo bench clean-venv

venv: $(STAMP)

# Last, the repository itself (editable, pyproject.toml): its packages and modules import from anywhere.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PIN)
	$(BIN)/python -m pip install -r requirements-dev.txt
	$(BIN)/python -m pip install --no-deps $(TORCHAUDIO_REF)
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

# A missing reference implementation (torchaudio, transformers, open_clip) fails the parity
# tests; only the tests marked `cuda` skip (without a GPU).
test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Skips the tests marked `heavy` (reference-parity runs at full ViT-B width).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not heavy" $(PYTEST_ARGS)

# One GPU, <= 8 minutes: the `cuda` tests, precision agreement, step time and memory, evaluation
# time, AST throughput, in one table (tools/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m tools.gpu_check

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash run_demo.sh $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.score_bench

clean-venv:
	rm -rf $(VENV)
