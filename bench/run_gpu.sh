#!/usr/bin/env bash
# One budgeted GPU run: the facts that matter most first, every step capped by the time left (so one
# hang cannot eat the rest), every result written to $OUT as it lands (a cut run still returns what
# finished), pytest verbose (a cut run still names what passed). One device command of at most 9 minutes:
#   OUT=$OUT BUDGET=500 bash bench/run_gpu.sh
#   ONLY=tests-compile,tests-nccl BUDGET=200 bash bench/run_gpu.sh      # a second, shorter command
# The package runs from the tree (the machine is offline). The compile cache is kept in one folder
# for the whole run (--cache-dir): without it every bench run starts cold.
set -uo pipefail
out=${OUT:?set OUT}; mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cache=/tmp/graphrt-cache; mkdir -p "$cache"
t0=$(date +%s); budget=${BUDGET:-500}
left() { echo $(( budget - ($(date +%s) - t0) )); }
step() {                      # step NAME CAP_SECONDS CMD...: runs CMD under min(CAP, time left - 10 s)
  local name=$1 cap=$2; shift 2
  if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]]; then return 0; fi
  local l; l=$(left)
  if (( l < 25 )); then echo "SKIP $name: ${l}s left" | tee -a "$out/steps.txt"; return 0; fi
  (( cap > l - 10 )) && cap=$(( l - 10 ))
  echo "== $name cap=${cap}s at +$(( $(date +%s) - t0 ))s" | tee -a "$out/steps.txt"
  timeout -k 5 "$cap" "$@" > "$out/$name.txt" 2>&1
  echo "   rc=$? $name done at +$(( $(date +%s) - t0 ))s" | tee -a "$out/steps.txt"
}
bench=(python -m graphrt.bench --no-progress --cache-dir "$cache")
pytest=(python -m pytest -v -rfE -p no:cacheprovider -m cuda tests/)
# 1. versions, and which SDPA kernel runs for the model's own layouts and masks (seconds)
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; } > "$out/gpu.txt" 2>&1
step sdpa-env 60 python "$here/sdpa_env.py" cuda
# 2. 480p, batch 1, the default GPU path (fused kernels, inductor="once"): its first start (capture s,
#    the compiles included) and the 6th chunk (KV 18 frames, the published comparison point)
step bench-480p-fused 240 "${bench[@]}" --preset wan-1.3b-480p --modes chunk-graph+fused \
  --repeats 0 --no-head-to-head --json "$out/bench-480p-fused.json" --md "$out/bench-480p-fused.md"
# 3. the same point without fusion or inductor: eager, graphs, chunk-graph (nothing compiles)
step bench-480p 130 "${bench[@]}" --preset wan-1.3b-480p --modes eager,graphs,chunk-graph \
  --repeats 0 --json "$out/bench-480p.json" --md "$out/bench-480p.md"
#    the CUDA tests that compile nothing (an Engine test on the default path compiles: see tests-compile)
step tests-fast 120 "${pytest[@]}" -k "not inductor and not flex and not nccl and not malloc_async and not compile and not once"
# 4. the launch-bound regime: 240p, one latent frame per chunk, reference included
step bench-240p 90 "${bench[@]}" --preset wan-1.3b-240p-f1 --modes reference,eager,chunk-graph,chunk-graph+fused \
  --repeats 0 --json "$out/bench-240p.json" --md "$out/bench-240p.md"
# 5. fp8 linears at 480p, each row beside its bf16 row with the error against it
step bench-fp8 90 "${bench[@]}" --preset wan-1.3b-480p --modes chunk-graph+fused --linear-dtype fp8 --repeats 0 \
  --json "$out/bench-fp8.json" --md "$out/bench-fp8.md"
# 6. batch 4 (4 sessions in one replay); batch 1 of step 3 is the one-at-a-time side (x4 sessions)
step bench-b4 90 "${bench[@]}" --preset wan-1.3b-480p --modes chunk-graph+fused --batch 4 --repeats 0 --chunks 4 \
  --no-head-to-head --json "$out/bench-b4.json" --md "$out/bench-b4.md"
# 7. prompt to frames with the tiny decoder beside the Wan VAE, and the server with 1 and 4 clients
step e2e 90 python -m graphrt.bench.e2e --preset wan-1.3b-480p --decoder both --json "$out/e2e.json"
step serve 60 python -m graphrt.bench.serve --clients 1,4 --chunks 3 --json "$out/serve.json" \
  --server-args "--decoder tiny --decoder-weights random --mode chunk"
# 8. what is left: the compile-heavy tests, then NCCL last
step tests-compile 200 "${pytest[@]}" -k "inductor or flex or malloc_async or compile or once"
step tests-nccl 60 "${pytest[@]}" -k nccl
echo "total +$(( $(date +%s) - t0 ))s" | tee -a "$out/steps.txt"
