#!/usr/bin/env bash
# Every GPU figure in the README comes from this script, run on one CUDA machine (torch and
# transformers preinstalled; prunekit from this checkout). Results go to $OUT (default
# bench/results/gpu). Each step has its own time limit, so one slow or failing step does not take
# the others with it. On a device call, keep the log even when the call's time runs out (a plain
# `grep` into a pipe buffers its output, and is killed with it):
#   OUT=$OUT bash bench/gpu_session.sh PART 2>&1 | grep --line-buffered -v -i warn | tee $OUT/log
#
#   bash bench/gpu_session.sh smoke   # every code path on 7B shapes, cut to 1-2 blocks (~2 min)
#   bash bench/gpu_session.sh prune   # the pruning benchmarks (~8.5 min on an H200)
#   bash bench/gpu_session.sh speed   # the 2:4 speed benchmarks (~5 min)
#   bash bench/gpu_session.sh storage # float32 vs bf16 block inputs, Wanda 50 % and 2:4 (~3 min)
#   bash bench/gpu_session.sh gram    # SparseGPT on 8 blocks and X^T X's GEMMs at 7B widths (~2 min)
#   bash bench/gpu_session.sh defaults # after targets (~5 min): CUDA tests, the targets under the default settings
#   bash bench/gpu_session.sh remaining # what those two left unmeasured (~5 min): CUDA tests, the floor with
#                                     # and without the fused RMSNorm and lean rotary embedding, AlphaPruning,
#                                     # plan offload at the defaults, ESD streams (its run of 2026-11-27 also
#                                     # timed the since-removed --compile, cold and warm: README)
#   bash bench/gpu_session.sh esd2    # after `remaining` (~5 min): the two-stage ESD's CUDA test, AlphaPruning end to end
#                                     # beside Wanda and STADE, the two-stage ESD by band width against eigvalsh, plan 2
#   bash bench/gpu_session.sh esd3    # next (~7.5 min): the device's cost per small op and per band-reduction column,
#                                     # the host's dsbev per band width, then whole-model AlphaPruning at --esd-band 16, 8 and 4 and 32 or 64 Grams at once,
#                                     # eager and replayed from a CUDA graph (--esd-graph)
#   bash bench/gpu_session.sh targets # the issue's targets in one call (~9 min): CUDA tests, the floor by residual
#                                     # stream x batch size, then at the fastest batch: Wanda under each plan,
#                                     # 2:4, STADE, AlphaPruning, SparseGPT (8 blocks), residual bf16 and float32
#   bash bench/gpu_session.sh         # prune, storage and speed
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

part=${1:-all}
# `targets`, `defaults`, `remaining`, `esd2` and `gram` take their sizes from here, so that they can be
# dry-run on the CPU first (each fits one 10-minute device call):
#   SHAPE=tiny SIZE="--layers 2 --nsamples 8 --seqlen 64" DEV=cpu ESD_LAYERS=1 \
#     GRAM_ARGS="--columns 64 --tokens 512 --repeat 1" OUT=/tmp/gpu-dry bash bench/gpu_session.sh esd2
SHAPE=${SHAPE:-7b} SIZE=${SIZE:-} DEV=${DEV:-cuda} ESD_LAYERS=${ESD_LAYERS:-4}
GRAM_ARGS=${GRAM_ARGS:---columns 4096 11008 --tokens 131072 --batches 8 --repeat 3}
BATCHES=${BATCHES:-1 4 8 16}
if [ "$part" = targets ]; then
  # the CUDA tests: every plan gives the same model, the worker's copies, --residual-dtype compute on the GPU,
  # the bf16 GEMM to a float32 X^T X
  step 100 $PY -m pytest -q -p no:cacheprovider tests/test_placement.py tests/test_speed.py tests/test_stade.py \
    -k "cuda or every_plan or streamer"
  # the floor by residual stream (float32, compute dtype) x sequences per forward, and its parts
  step 80 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --runs --residual-dtype float32 compute \
    --floor-batches $BATCHES --floor-parts --out "$OUT/gpu_floors.json"
  B=$($PY -c "import json, sys; g = json.load(open(sys.argv[1]))['meta']['floor_grid_s']
print(min((v, int(k.split()[1])) for k, v in g.items() if k.startswith('compute'))[1])" "$OUT/gpu_floors.json" || echo 1)
  echo "batch size for the runs: $B"
  # Wanda 50 % under each plan, the residual stream in bf16
  step 150 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --batch-size $B --runs wanda --offload auto weights cpu \
    --residual-dtype compute --out "$OUT/gpu_wanda_plans.json"
  # 2:4, STADE and AlphaPruning (plan auto), the residual stream in bf16; then Wanda, 2:4, STADE with a float32 one
  step 130 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --batch-size $B --runs "wanda 2:4" stade "wanda alpha" \
    --residual-dtype compute --out "$OUT/gpu_runs_bf16res.json"
  step 100 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --batch-size $B --runs wanda "wanda 2:4" stade \
    --residual-dtype float32 --out "$OUT/gpu_runs_f32res.json"
  # SparseGPT, 8 of the 32 blocks (X^T X by one bf16 GEMM to float32)
  step 60 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --layers 8 --batch-size $B --no-floor --runs sparsegpt \
    --residual-dtype compute float32 --out "$OUT/gpu_sparsegpt.json"
  exit 0
fi
if [ "$part" = defaults ]; then
  # after `targets`: the staging ring's copies, the ESD's threads and the plans' equality on the GPU; then the
  # issue's targets under the defaults (8 sequences a forward, float32 residual stream), then --residual-dtype compute
  step 45 $PY -m pytest -q -p no:cacheprovider tests/test_placement.py -k "cuda or every_plan"
  step 150 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --runs wanda "wanda 2:4" stade "wanda alpha" \
    --out "$OUT/gpu_defaults.json"
  step 70 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs wanda --offload weights cpu \
    --out "$OUT/gpu_defaults_plans.json"
  step 60 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs wanda "wanda 2:4" --residual-dtype compute \
    --out "$OUT/gpu_defaults_bf16res.json"
  exit 0
fi
if [ "$part" = esd2 ]; then
  # the two-stage ESD (band reduction on the GPU, LAPACK dsbev on the host's threads), which `auto` now
  # takes for AlphaPruning on a GPU: its CUDA test, then AlphaPruning on the whole model beside Wanda and
  # STADE in one process, then band widths 8, 16, 32 against cuSOLVER's eigvalsh on 4 blocks, then plan 2
  step 40 $PY -m pytest -q -p no:cacheprovider tests/test_band.py -k cuda
  step 140 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs "wanda alpha" wanda stade \
    --out "$OUT/gpu_alpha_two_stage.json"
  step 70 $PY bench/bench_esd.py --random $SHAPE --layers $ESD_LAYERS --device $DEV --precisions float64 \
    --bands 8 16 32 --skip-byte-key --out "$OUT/esd_two_stage.json"
  step 55 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs wanda --offload weights --out "$OUT/gpu_plan2.json"
  exit 0
fi
if [ "$part" = esd3 ]; then
  # the two-stage ESD's balance: esd2 found both halves near 20 s at band 16 (the GPU's ~2.4 s a batch,
  # the host's LAPACK ~1.5 s a matrix a thread); a narrower band moves work from the host to the GPU,
  # and more Grams a batch share the GPU's launches. First what a launch costs there and the host half
  # alone (--host-floor: dsbev at b = 16, 8, 4, 2 and 1, dsterf, with every host thread busy), then the
  # whole model.
  step 70 $PY bench/bench_esd.py --random $SHAPE --layers 1 --device $DEV --precisions float64 --launch-probe \
    --host-floor --bands 16 8 4 2 --key-only --skip-byte-key --out "$OUT/esd_probe.json"
  # the band reduction replayed from a CUDA graph (--esd-graph): its test, then beside the eager rows
  step 60 $PY -m pytest -q -p no:cacheprovider tests/test_band.py -k cuda
  step 330 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs wanda "wanda alpha" "wanda alpha --esd-band=8" \
    "wanda alpha --esd-band=8 --esd-graph" "wanda alpha --esd-band=4 --esd-batch=64" \
    "wanda alpha --esd-band=4 --esd-batch=64 --esd-graph" --out "$OUT/gpu_alpha_bands.json"
  exit 0
fi
if [ "$part" = remaining ]; then
  # what `targets` and `defaults` left unmeasured, in one call (~9.5 min), the issue's targets first: the
  # CUDA tests after the ESD's one-thread linalg load and the staging ring; AlphaPruning on the whole
  # model and Wanda under --offload cpu at the defaults; the floor with the fused RMSNorm and the lean
  # rotary embedding (the default) and with transformers' own forwards; the ESD's 1, 2, 4, 8 streams and
  # MAGMA's eigensolver, the cache key and the alpha fits on the GPU against the host
  step 100 $PY -m pytest -q -p no:cacheprovider tests/test_placement.py tests/test_speed.py tests/test_stade.py \
    tests/test_dtypes.py tests/test_norms.py tests/test_allocation_math.py -k "cuda or every_plan or streamer"
  step 110 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs "wanda alpha" --out "$OUT/gpu_alpha.json"
  step 50 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --no-floor --runs wanda --offload cpu --out "$OUT/gpu_offload.json"
  step 45 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --runs --floor-own-forwards --out "$OUT/gpu_own_forwards.json"
  step 50 $PY bench/bench_esd.py --random $SHAPE --layers $ESD_LAYERS --device $DEV --precisions float64 --streams 1 2 4 8 \
    --linalg default magma --skip-byte-key --out "$OUT/esd_streams.json"
  exit 0
fi
if [ "$part" = gram ]; then
  # SparseGPT, 8 of the 32 blocks, X^T X by one bf16 GEMM to float32 (stats.EXACT_LOW_GRAM); the
  # last run (float32 GEMM) spent 20.4 of its 36.7 s in the statistics passes
  step 70 $PY bench/bench_gpu.py --shape $SHAPE $SIZE --layers 8 --no-floor --runs sparsegpt --out "$OUT/gpu_sparsegpt.json"
  # that X^T X alone at 7B widths: float32 GEMM, upper triangle by bands, bf16 GEMM to float32
  step 60 $PY bench/bench_gram.py --device $DEV $GRAM_ARGS --out "$OUT/gram.json"
  exit 0
fi
if [ "$part" = all ] || [ "$part" = prune ]; then
  # issue 9: Wanda 50 % under each placement plan, and the eager floor
  step 160 $PY bench/bench_gpu.py --shape 7b --runs wanda --offload auto weights cpu --out "$OUT/gpu_wanda.json"
  # issue 9: 2:4 and STADE (plan auto)
  step 110 $PY bench/bench_gpu.py --shape 7b --no-floor --runs "wanda 2:4" stade --out "$OUT/gpu_runs.json"
  # issue 9: AlphaPruning on top of Wanda (the float64 ESD of 224 matrices included)
  step 100 $PY bench/bench_gpu.py --shape 7b --no-floor --runs "wanda alpha" --out "$OUT/gpu_alpha.json"
  # issue 10: SparseGPT, 8 of the 32 blocks (the reference's figure is for 8 blocks too)
  step 70 $PY bench/bench_gpu.py --shape 7b --layers 8 --no-floor --runs sparsegpt --out "$OUT/gpu_sparsegpt.json"
  # issue 9: ESD precision and time on 7B-shaped weights (2 blocks)
  step 30 $PY bench/bench_esd.py --random 7b --layers 2 --device cuda --skip-byte-key --out "$OUT/esd_cuda.json"
  # issue 9: torch.compile on a block pass, compile time counted (why prunekit has no --compile)
  step 40 $PY bench/bench_gpu.py --shape 7b --no-floor --runs --compile-trial --out "$OUT/gpu_compile.json"
fi
if [ "$part" = all ] || [ "$part" = storage ]; then
  # issue 9: what float32 block inputs (--activation-dtype auto on the device) cost against bf16
  step 200 $PY bench/bench_gpu.py --shape 7b --no-floor --runs wanda "wanda 2:4" --activation-dtype auto bfloat16 \
    --out "$OUT/gpu_storage.json"
fi
if [ "$part" = all ] || [ "$part" = speed ]; then
  # issue 12: 2:4 speed per layer shape (every path, eager and graphed) and prefill
  step 150 $PY bench/bench_sparse24.py --shape 7b --dtype bfloat16 --out "$OUT/sparse24.json"
  step 150 $PY bench/bench_sparse24.py --shape 7b --dtype float16 --out "$OUT/sparse24_fp16.json"
fi
