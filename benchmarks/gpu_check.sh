#!/usr/bin/env bash
# The GPU check of issue 9: on a machine with a GPU, the benchmarks and a whole-model
# attn-progressive prune of SmolLM2's q/k, and (issue 22) a whole-model attn-block-reweight prune
# of every linear, in under 13 minutes, numbers written to one file.
#
#   benchmarks/gpu_check.sh [RESULT_FILE]      (default: $OUT/gpu_check.txt, else out/gpu_check.txt)
#
# Needs a Python with this project's requirements and a CUDA build of jaxlib (PYTHON, default
# .venv/bin/python if it exists, else python3); the repository root goes on PYTHONPATH, so no
# install is needed. The code itself is the same as on the CPU: JAX places it on the GPU.
# Every step has its own time limit so that the whole stays under 13 minutes; a step that fails
# or runs out of time is recorded in the file and the next one runs.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RESULT=${1:-${OUT:-out}/gpu_check.txt}
mkdir -p "$(dirname "$RESULT")"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)

step() {  # step SECONDS TITLE COMMAND...: runs COMMAND, its output and status go to RESULT
  local limit=$1 title=$2
  shift 2
  echo "== $title ($(($(date +%s) - start)) s in): $*" | tee -a "$RESULT"
  timeout "$limit" "$@" 2>&1 | tee -a "$RESULT"
  local status=${PIPESTATUS[0]}
  echo "== exit $status" | tee -a "$RESULT"
  return "$status"
}

{
  echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
} | tee "$RESULT"
step 60 "devices" "$PYTHON" -c "import jax; print(jax.__version__, jax.devices()); \
assert jax.devices()[0].platform == 'gpu', 'no GPU: this check is for a GPU machine'" || exit 1
step 300 "whole-model prune time: sparsegpt vs attn-block-reweight, every linear at 0.6" \
  "$PYTHON" benchmarks/prune_time.py --targets all --sparsity 0.6 \
  --methods sparsegpt attn-block-reweight
step 90 "solver FLOP rate and bfloat16" "$PYTHON" benchmarks/solver_flops.py --runs 3
step 60 "one step's memory at h=9 b=8 n=4096 d=576" "$PYTHON" benchmarks/solver_memory.py
step 60 "model throughput" "$PYTHON" benchmarks/model_throughput.py --batch 8
step 60 "baselines" "$PYTHON" benchmarks/baselines_speed.py
step 150 "whole-model prune time: magnitude vs attn-progressive, 30 layers" \
  "$PYTHON" benchmarks/prune_time.py --methods magnitude attn-progressive
echo "gpu_check done in $(($(date +%s) - start)) s; numbers in $RESULT" | tee -a "$RESULT"
