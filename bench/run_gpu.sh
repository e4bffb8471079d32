#!/usr/bin/env bash
# A GPU session in steps that each fit one 10-minute device command. Results go to
# ${OUT:-bench/results}; the bench writes its JSON/markdown after every mode, so a step cut short
# keeps the modes it finished. The package runs from the tree (no install: the machine is offline).
#   bench/run_gpu.sh tests                                   # CUDA tests + the CUDA-relevant suites
#   bench/run_gpu.sh bench wan-1.3b-480p 1 reference,eager,graphs,chunk-graph
#   bench/run_gpu.sh bench wan-1.3b-480p 1 graphs+inductor,compile   # cold inductor: its own step
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/graphrt-inductor}
case "${1:-}" in
  tests)
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/gpu.txt" 2>&1
    timeout 540 python -m pytest -q -rs -s tests/test_cuda.py tests/test_compile.py tests/test_causal.py \
      tests/test_pipeline.py 2>&1 | tee "$out/cuda-tests.txt" ;;
  bench)
    preset=$2 batch=$3 modes=${4:-reference,eager,graphs,chunk-graph,graphs+inductor,compile}
    tag="$preset-b$batch-${modes//[,+]/_}"
    timeout "${BENCH_TIMEOUT:-560}" python -m graphrt.bench --preset "$preset" --batch "$batch" --modes "$modes" \
      --repeats 1 --no-progress --json "$out/$tag.json" --md "$out/$tag.md" 2>&1 | tee "$out/$tag.txt" ;;
  *) echo "usage: $0 tests | bench PRESET BATCH [MODES]" >&2; exit 2 ;;
esac
