"""The fused kernel path against today's modes on the CPU, 1 thread, thread CPU time per steady chunk.

The fused modes (``graphs+fused``, ``chunk-graph+fused``) compile with inductor; on the CPU
inductor traces each fused op as its aten reference and fuses it itself (their Triton kernels run
on CUDA), so this measures whether the fused path keeps up with today's best CPU mode, not what
fusion gains on a GPU. The interpreter run at the end is a correctness check only (the interpreter
is Python, orders of magnitude slower).

    PYTHONPATH=. python bench/results/fused-cpu.py bench/results/fused-cpu.json
    PYTHONPATH=. python bench/results/fused-cpu.py bench/results/fused-cpu-best.json best-only tiny 8
    PYTHONPATH=. python bench/results/fused-cpu.py bench/results/fused-cpu-width-best.json best-only wan-1.3b-width-cpu 4
"""
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

import torch

from graphrt.bench.core import head_to_head, run
from graphrt.bench.presets import PRESETS, BenchConfig
from graphrt.bench.timing import Clock, torch_threads
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.pipeline import FlowMatchSchedule

MODES = ("eager", "graphs", "chunk-graph", "graphs+fused", "chunk-graph+fused", "chunk-graph+inductor")
PAIRS = (("graphs+fused", "graphs"), ("chunk-graph+fused", "chunk-graph"), ("chunk-graph+fused", "chunk-graph+inductor"))
CHUNKS, REPEATS, VIDEOS_IN_TURN = 6, 8, 8

INTERPRETED = r"""
import json, torch
from graphrt.bench.presets import PRESETS
from graphrt.models.wan import CausalWan
from graphrt.tolerance import max_rel_err, tolerance
out = {}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].config(1).replace(num_layers=1)
    aten = CausalWan(cfg, kernels="aten").to(dtype).eval()
    fused = CausalWan(cfg, kernels="fused").to(dtype).eval()
    fused.load_state_dict(aten.state_dict())
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, dtype=dtype)
    t = torch.full((1,), 500.0)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    with torch.no_grad():
        err = max_rel_err(fused(x, t, ctx).float(), aten(x, t, ctx).float())
    out[str(dtype).removeprefix("torch.")] = {"max_rel_err": err, "tolerance": tolerance(dtype),
                                             "within": err <= tolerance(dtype)}
print(json.dumps(out))
"""


def in_turn(preset: str, chunks: int, pairs, cfg: BenchConfig, videos: int) -> dict:
    """Each pair in turn (A B A B ...): both modes of a pair meet the same load."""
    out = {}
    wcfg = PRESETS[preset].config(chunks)
    with torch_threads(1), torch.no_grad():
        torch.manual_seed(0)
        dtype = getattr(torch, PRESETS[preset].dtype)
        ref = ReferenceWan(wcfg).to(dtype).eval()
        causal = CausalWan(wcfg, attention="sdpa", kernels="aten").to(dtype).eval()
        causal.load_state_dict(ref.state_dict(), assign=True)
        steps = PRESETS[preset].steps
        schedule = FlowMatchSchedule(steps=tuple(1000.0 * (1 - i / steps) for i in range(steps)))
        context = torch.randn(1, wcfg.text_len, wcfg.text_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
        for pair in pairs:
            h = head_to_head(pair, causal, ref, schedule, cfg, context, chunks, videos, Clock(torch.device("cpu")))
            out[f"{pair[0]} vs {pair[1]}"] = {
                "fused_ms": h["best_ms"], "other_ms": h["peer_ms"], "other_over_fused": h["ratio"],
                "fused_spread": h["best_cpu_ms_spread"], "other_spread": h["peer_cpu_ms_spread"],
                "steady_chunks": h["steady_chunks"]}
            print(pair, out[f"{pair[0]} vs {pair[1]}"], file=sys.stderr)
    return out


def main(path: str, preset: str = "tiny", inductor: bool = True) -> None:
    cache = tempfile.mkdtemp(prefix="graphrt-fused-cpu-")
    modes = MODES if inductor else tuple(m for m in MODES if "inductor" not in m)
    pairs = PAIRS if inductor else tuple(p for p in PAIRS if "inductor" not in p[1])
    chunks = CHUNKS if preset == "tiny" else PRESETS[preset].chunks
    cfg = BenchConfig(preset=preset, modes=modes, chunks=chunks, repeats=REPEATS, kv_buckets="max", threads=1,
                      cache_dir=cache, head_to_head=False, progress=False)
    summary = run(cfg)
    c = summary["config"]
    out = {"what": f"thread CPU ms (time.thread_time) per steady chunk (every chunk but a video's first), {preset} "
                   f"preset (dim {c['dim']}, {c['num_layers']} layers, {c['frame_tokens']} tokens per latent frame, "
                   f"{c['dtype']}, 4 steps + cache pass), {chunks} chunks per video, {1 + REPEATS} videos, 1 torch thread, "
                   "kv_buckets='max' (one graph per mode, so chunk-graph+inductor compiles one AOTInductor package); "
                   "fused ops run their aten reference on the CPU",
           "command": "PYTHONPATH=. python " + " ".join(sys.argv),
           "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "load_average_start": list(os.getloadavg()), "modes": {}}
    for m, r in summary["modes"].items():
        out["modes"][m] = r if "skipped" in r else {
            k: r.get(k) for k in ("kernel_path", "fused_ops", "chunk_cpu_ms_median", "chunk_cpu_ms_p90",
                                  "chunk_cpu_ms_spread", "steady_chunks", "chunk6_cpu_ms", "max_err_vs_reference",
                                  "graphs", "capture_s", "warnings")}
    out["in_turn"] = in_turn(preset, chunks, pairs, cfg, VIDEOS_IN_TURN)
    if preset != "tiny":
        out["load_average_end"] = list(os.getloadavg())
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=1800)
    out["interpreter_correctness"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
        else {"failed": proc.stderr[-2000:]}
    out["load_average_end"] = list(os.getloadavg())
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[2:3] == ["best-only"]:      # the fused whole chunk against today's best mode, in turn only
        preset = sys.argv[3]
        cfg = BenchConfig(preset=preset, kv_buckets="max", threads=1, cache_dir=tempfile.mkdtemp(), progress=False)
        result = {"what": f"{preset}: thread CPU ms per steady chunk, in turn, 1 thread, kv_buckets='max'",
                  "command": "PYTHONPATH=. python " + " ".join(sys.argv), "torch": torch.__version__,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "load_average_start": list(os.getloadavg()),
                  "in_turn": in_turn(preset, CHUNKS if preset == "tiny" else PRESETS[preset].chunks, (PAIRS[-1],),
                                     cfg, int((sys.argv[4:5] or ["4"])[0])),
                  "load_average_end": list(os.getloadavg())}
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=2)
    else:
        main(sys.argv[1], *(sys.argv[2:3] or ["tiny"]), inductor="no-inductor" not in sys.argv[3:])
