#!/usr/bin/env bash
# One GPU session, one script: the CUDA tests, then the bench presets, everything written to
# ${OUT:-bench/results}. Each bench run is bounded so one slow mode cannot eat the session.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
python -m pip install -q --no-deps -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/gpu.txt"
timeout 300 python -m pytest -q -rs tests/test_cuda.py tests/test_compile.py tests/test_causal.py 2>&1 | tail -40 > "$out/cuda-tests.txt"
for run in "wan-1.3b-480p 1" "wan-1.3b-240p-f1 1" "wan-1.3b-480p 4" "wan-1.3b-240p-f1 4"; do
  set -- $run
  timeout "${BENCH_TIMEOUT:-420}" python -m graphrt.bench --preset "$1" --batch "$2" --repeats 1 --no-progress \
    --json "$out/$1-b$2.json" --md "$out/$1-b$2.md" > "$out/$1-b$2.txt" 2>&1 || echo "bench $1 batch $2 exited $?" >> "$out/$1-b$2.txt"
done
