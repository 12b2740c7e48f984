# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv if missing, install torch first (CPU wheel here; pip picks the CUDA build on a GPU box),
# then the project, and run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export det_data ?= $(CURDIR)/det_data
export det_models ?= $(CURDIR)/det_models
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test lint bench-prep

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/nndet demo

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check planner ops apps bundles tests benchmarks

# Benchmarks (not part of CI). bench-prep compares nndet_prep with nnU-Net v2 in a separate venv:
# nnunetv2 pulls timm/torchvision, which must not leak into the main environment.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed:
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/python -m pip install -q -c $(BENCH_VENV)/constraints.txt "nnunetv2>=2.5" "psutil>=5.9"
	touch $@

bench-prep: setup $(BENCH_VENV)/.installed
	$(BIN)/python -m pip install -q psutil
	$(BIN)/python benchmarks/prep.py --nnunet_bin $(BENCH_VENV)/bin --ours_bin $(BIN)
