#!/usr/bin/env bash
# Every GPU figure in the README comes from this script, run on one CUDA machine (torch and
# transformers preinstalled; prunekit from this checkout). Results go to $OUT (default
# bench/results/gpu). Each step has its own time limit, so one slow or failing step does not take
# the others with it.
#
#   bash bench/gpu_session.sh smoke   # every code path on 7B shapes, cut to 1-2 blocks (~1 min)
#   bash bench/gpu_session.sh         # the benchmarks (~8 min on an H100/H200)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
step() { local limit=$1; shift; echo "=== $(date +%T) [limit ${limit}s] $*"; timeout "$limit" "$@"; echo "=== exit $?"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'|', torch.cuda.get_device_name(), '| cusparselt', torch.backends.cusparselt.is_available())"

if [ "${1:-}" = smoke ]; then
  step 120 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_placement.py tests/test_speed.py
  step 90 $PY bench/bench_gpu.py --shape 7b --layers 2 --nsamples 16 --runs wanda --offload auto weights cpu \
    --out "$OUT/smoke_gpu.json"
  step 90 $PY bench/bench_gpu.py --shape 7b --layers 2 --nsamples 16 --no-floor \
    --runs "wanda 2:4 alpha" stade sparsegpt --out "$OUT/smoke_gpu2.json"
  step 60 $PY bench/bench_sparse24.py --shape 7b --layers 1 --tokens 16,2048 --out "$OUT/smoke_sparse24.json"
  exit 0
fi

# issue 9: Wanda 50 % under each placement plan, the eager floor, the torch.compile trial
step 160 $PY bench/bench_gpu.py --shape 7b --runs wanda --offload auto weights cpu --out "$OUT/gpu_wanda.json"
# issue 9: 2:4, STADE, AlphaPruning on top of Wanda (plan auto)
step 150 $PY bench/bench_gpu.py --shape 7b --no-floor --runs "wanda 2:4" stade "wanda alpha" \
  --out "$OUT/gpu_runs.json"
# issue 12: 2:4 speed per layer shape (every path, eager and graphed) and prefill, bf16 and fp16
step 110 $PY bench/bench_sparse24.py --shape 7b --dtype bfloat16 float16 --out "$OUT/sparse24.json"
# issue 10: SparseGPT, 8 of the 32 blocks (the reference's figure is for 8 blocks too)
step 70 $PY bench/bench_gpu.py --shape 7b --layers 8 --no-floor --runs sparsegpt --out "$OUT/gpu_sparsegpt.json"
# issue 9: ESD precision and time on 7B-shaped weights (2 blocks; the full-model ESD time is in gpu_runs)
step 30 $PY bench/bench_esd.py --random 7b --layers 2 --device cuda --skip-byte-key --out "$OUT/esd_cuda.json"
# issue 9: torch.compile on a block pass, compile time counted
step 40 $PY bench/bench_gpu.py --shape 7b --no-floor --runs --compile-trial --out "$OUT/gpu_compile.json"
