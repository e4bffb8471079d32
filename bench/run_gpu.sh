#!/usr/bin/env bash
# A GPU session in steps that each fit one 10-minute device command. Results go to
# ${OUT:-bench/results}; the bench writes its JSON/markdown after every mode, so a step cut short
# keeps the modes it finished. The package runs from the tree (no install: the machine is offline).
#   bench/run_gpu.sh info                                    # GPU, driver, torch, CUDA
#   bench/run_gpu.sh tests                                   # every cuda-marked test in tests/, ~2-4 min
#   bench/run_gpu.sh suite                                   # the whole suite (run it with CUDA_VISIBLE_DEVICES= for the CPU part)
#   bench/run_gpu.sh attention wan-1.3b-480p                 # attention kernels alone, per KV length
#   bench/run_gpu.sh bench wan-1.3b-480p 1 reference,eager,graphs,chunk-graph,graphs+fused,chunk-graph+fused   # the default modes (aten and fused, like for like); each mode's
#     notes name the attention kernels of the profiled 6th chunk (cuDNN or flash?), the JSON has its top kernels and chunk6_ms
#   bench/run_gpu.sh bench wan-1.3b-480p 1 graphs+inductor   # each slow mode is a step of its own:
#   bench/run_gpu.sh bench wan-1.3b-480p 1 compile           # a cold compile cache fills most of one
#   CHUNKS=2 bench/run_gpu.sh bench wan-1.3b-480p 1 chunk-graph+inductor   # whole-chunk compiles: 2 KV buckets
#   CHUNKS=2 bench/run_gpu.sh bench wan-1.3b-480p 1 compile-chunk
#   DEPS=wheels/ bench/run_gpu.sh e2e wan-1.3b-480p            # prompt -> frames: CUDA video tests + e2e bench
#     (the Wan VAE is diffusers': DEPS names a folder of wheels, e.g. diffusers and pillow, installed offline)
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/graphrt-inductor}
case "${1:-}" in
  info)
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
      nproc; } > "$out/gpu.txt" 2>&1; cat "$out/gpu.txt" ;;
  tests)
    timeout "${TEST_TIMEOUT:-540}" python -m pytest -q -rs -s -p no:cacheprovider -m cuda --durations=0 \
      tests/ 2>&1 | tee "$out/cuda-tests.txt" ;;
  suite)
    timeout "${TEST_TIMEOUT:-540}" python -m pytest -q -rs -p no:cacheprovider 2>&1 | tee "$out/suite${CUDA_VISIBLE_DEVICES+-cpu}.txt" ;;
  attention)
    timeout "${BENCH_TIMEOUT:-300}" python -m graphrt.bench.attention --preset "$2" --json "$out/attention-$2.json" 2>&1 \
      | grep -v '^{' | tee "$out/attention-$2.txt" ;;
  bench)
    preset=$2 batch=$3 modes=${4:-reference,eager,graphs,chunk-graph,graphs+fused,chunk-graph+fused}
    if [[ ",$modes," =~ ,(graphs\+inductor|chunk-graph\+inductor|compile|compile-chunk), && "$modes" == *,* ]]; then
      echo "run each inductor mode and each compile peer as a step of its own (a cold compile takes minutes)" >&2; exit 2
    fi
    tag="$preset-b$batch-${modes//[,+]/_}${CHUNKS:+-c$CHUNKS}"
    timeout "${BENCH_TIMEOUT:-560}" python -m graphrt.bench --preset "$preset" --batch "$batch" --modes "$modes" \
      --repeats "${REPEATS:-1}" ${CHUNKS:+--chunks "$CHUNKS"} ${KV_BUCKETS:+--kv-buckets "$KV_BUCKETS"} --no-progress --json "$out/$tag.json" --md "$out/$tag.md" 2>&1 \
      | grep -v '^{' | tee "$out/$tag.txt" ;;
  e2e)
    preset=${2:-wan-1.3b-480p}
    if [ -n "${DEPS:-}" ]; then
      pip install --no-index --no-deps --target /tmp/graphrt-deps -q "$DEPS"/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/graphrt-deps
    fi
    timeout "${TEST_TIMEOUT:-150}" python -m pytest -q -rs -p no:cacheprovider tests/test_video_cuda.py 2>&1 \
      | tee "$out/video-cuda-tests.txt"
    timeout "${BENCH_TIMEOUT:-400}" python -m graphrt.bench.e2e --preset "$preset" --chunks "${CHUNKS:-4}" \
      --json "$out/e2e-$preset.json" 2>&1 | grep -v '^{' | tee "$out/e2e-$preset.txt" ;;
  *) echo "usage: $0 info | tests | suite | attention PRESET | bench PRESET BATCH [MODES] | e2e [PRESET]" >&2; exit 2 ;;
esac
