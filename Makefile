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

.PHONY: setup demo test lint bench-prep gpu-check gpu-check-dry

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev,deploy]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/nndet demo

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check $(wildcard planner ops apps bundles tests benchmarks)

# Benchmarks (not part of CI). bench-prep compares nndet_prep with nnU-Net v2 in a separate venv (.venv-bench)
# whose torch is the main one's, pinned by a constraints file so pip never fetches another torch build.
# nnunetv2 and dynamic-network-architectures go in without their dependencies: their only route to
# timm -> torchvision, which nnUNetv2_plan_and_preprocess never imports (timm serves some of the network
# architectures only) and whose PyPI wheel does not load beside a local CPU-only torch
# ("operator torchvision::nms does not exist"). Their other dependencies are listed in BENCH_DEPS; pip
# then reports "dynamic-network-architectures requires timm, which is not installed": expected, harmless.
# BENCH_PREP_ARGS are the sizes of the table in benchmarks/RESULTS.md (~15 min on a 2-core VM).
BENCH_VENV ?= .venv-bench
NNUNET_VERSION ?= 2.8.1
BENCH_DEPS := "acvl-utils>=0.2.6,<0.3" "batchgenerators>=0.25.1" "batchgeneratorsv2>=0.3.2" "blosc2>=3.3.2" \
	einops graphviz imagecodecs matplotlib nibabel "numpy>=1.24" pandas requests scikit-image scikit-learn \
	scipy seaborn "SimpleITK>=2.2.1" tifffile tqdm yacs "psutil>=5.9"
$(BENCH_VENV)/.installed:
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps "nnunetv2==$(NNUNET_VERSION)" \
		"dynamic-network-architectures>=0.4.4,<0.5"
	$(BENCH_VENV)/bin/python -m pip install -q -c $(BENCH_VENV)/constraints.txt $(BENCH_DEPS)
	OMP_NUM_THREADS=1 $(BENCH_VENV)/bin/python -c "import nnunetv2.experiment_planning.plan_and_preprocess_entrypoints"
	touch $@

BENCH_PREP_ARGS ?= --np 2 --toy_cases 30 --toy_size 128 --ct_cases 12 --ct_size 256 --repeats 3
bench-prep: setup $(BENCH_VENV)/.installed
	$(BIN)/python -m pip install -q psutil
	$(BIN)/python benchmarks/prep.py --nnunet_bin $(BENCH_VENV)/bin --ours_bin $(BIN) $(BENCH_PREP_ARGS)

# The one device check of a lent GPU machine (benchmarks/gpu_check.sh: parity tests, box ops, training step,
# inference; report in gpu_check_out/gpu_report.md). gpu-check-dry rehearses every step on the CPU at tiny sizes.
gpu-check:
	bash benchmarks/gpu_check.sh

gpu-check-dry: setup
	bash benchmarks/gpu_check.sh --dry-run
