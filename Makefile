# `make test` and `make bench` each set up everything on a fresh machine: a .venv (reusing an installed torch,
# as on a GPU machine, or installing torch==2.14.1 + torchvision==0.29.1), the package with its extras, the CUDA
# extension when nvcc is present, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastlayers-installed
# Build the CUDA extension (and fail on a broken build) whenever nvcc is on PATH.
BUILD_CUDA ?= $(if $(shell command -v nvcc 2>/dev/null),1,0)
export TORCH_CUDA_ARCH_LIST ?= 9.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench install check info clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --upgrade "pip>=23" setuptools wheel
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "make: reusing torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	    echo "make: installing torch==2.14.1 torchvision==0.29.1"; \
	    $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1; \
	fi
	FASTLAYERS_BUILD_CUDA=$(BUILD_CUDA) $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	FASTLAYERS_REQUIRE_CUDA_EXT=$(BUILD_CUDA) $(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/fastlayers bench $(BENCH_ARGS)

check: $(STAMP)
	$(VENV)/bin/fastlayers check

info: $(STAMP)
	$(VENV)/bin/fastlayers info

clean:
	rm -rf build python/fastlayers/_C*.so *.egg-info python/*.egg-info
