#!/usr/bin/env bash
# One device check for a lent GPU machine (H100/H200), in one `device` call of under 8 minutes:
#
#   ../shared/tools/device-wheels                      # here, once: wheels the GPU image lacks -> .whl/
#   device run: bash benchmarks/gpu_check.sh            (carry: [".whl"], timeout_s: 540)
#   make gpu-check                                      # the same, where a GPU is local
#   bash benchmarks/gpu_check.sh --dry-run              # rehearsal on the CPU: every step at tiny sizes
#
# Steps (each with its own time limit; a failing step is reported and the next one runs):
#   env         nvidia-smi, python, torch / CUDA / cupy versions
#   parity      GPU parity tests of the box kernels (pytest -m gpu tests/ops tests/bundles/test_detector.py)
#   box_ops     benchmarks/box_ops.py: CUDA kernels vs CPU fallbacks vs MONAI
#   train_step  benchmarks/train_step.py: default plan of a CT-like task (it/s, data-wait share, peak memory vs
#               the planner's estimate)
#   ddp         benchmarks/train_step.py --ddp N: DDP overhead at N=1 vs plain steps; N = the GPUs lent, with the
#               throughput and scaling efficiency from 1 to N GPUs when N > 1
#   inference   benchmarks/inference.py on 512x512x256: 1 fold x 1 TTA, 5 x 8, MONAI's sliding window
# Writes $OUT/gpu_report.md (the tables, one section per step) and $OUT/<step>.log; OUT defaults to
# ./gpu_check_out. Copy the report's tables into benchmarks/RESULTS.md with machine and date.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ "$DRY" = 1 ] && PY=.venv/bin/python
REPORT="$OUT/gpu_report.md"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/nndet_site .whl/*.whl \
    && export PYTHONPATH="/tmp/nndet_site:$PYTHONPATH"
fi

{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ', DRY RUN on the CPU: sizes are tiny, numbers mean nothing'))"
  echo
} > "$REPORT"

failed=0
step() {  # step NAME SECONDS COMMAND...: run it, log it, put its tables (lines starting with '|') in the report
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  {
    echo "## $name (exit $rc, ${took} s)"
    echo
    echo '```'
    echo "$*"
    echo '```'
    echo
    grep -E '^\|' "$OUT/$name.log" || tail -n 15 "$OUT/$name.log"
    echo
  } >> "$REPORT"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  echo "gpu_check: $name exit $rc in ${took} s"
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | sed 's/^/| /'; \
  $PY -c 'import sys, torch; print(\"| python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| cuda\", \
  torch.version.cuda, \"| device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"none\")'; \
  $PY -c 'import cupy; print(\"| cupy\", cupy.__version__)' 2>&1 | sed 's/^\([^|]\)/| \1/'"

if [ "$DRY" = 1 ]; then
  step parity 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_boxes.py
  step box_ops 300 "$PY" benchmarks/box_ops.py --sizes 100 300 --dense_sizes 100 --reps 1 --iou_max_n 300
  step train_step 300 "$PY" benchmarks/train_step.py --preset cpu --size 48 --cases 2 --steps 2 --warmup 1 \
    --loader_batches 2 --workers 0
  step ddp 300 "$PY" benchmarks/train_step.py --preset cpu --size 48 --cases 2 --steps 5 --warmup 1 --workers 0 --ddp 1
  step inference 300 "$PY" benchmarks/inference.py --preset cpu --shape 64 64 32 --runs ours:1:1 monai:1:1
else
  step parity 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/bundles/test_detector.py
  step box_ops 90 "$PY" benchmarks/box_ops.py --reps 3
  step train_step 120 "$PY" benchmarks/train_step.py --preset default --size 256 --steps 30 --warmup 5
  step ddp 120 "$PY" benchmarks/train_step.py --preset default --size 256 --steps 15 --warmup 3 \
    --ddp "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1)"
  step inference 180 "$PY" benchmarks/inference.py --shape 512 512 256 --runs ours:1:1 ours:5:8 monai:1:1 \
    --device cuda
fi
echo "report: $REPORT ($failed step(s) failed)"
[ "$failed" -eq 0 ]
