"""First and second start of an Engine on inductor="once", two fresh processes on one inductor cache.

The CPU stand-in for the GPU default's start-up cost: ``backend="eager"`` (the CPU emulation replays
ops, so compiled code runs only without it), the 1-layer tiny model, 4 KV buckets, forward and whole
chunk. Each start builds the engine, captures (compiles) every bucket and makes one video; the second
process finds inductor's caches (``TORCHINDUCTOR_CACHE_DIR``, fresh for this run) and only retraces.
Wall seconds on this project's shared 2-core machine.

    PYTHONPATH=. python bench/results/once-cpu.py bench/results/once-cpu.json
"""
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

ONE = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine
torch.manual_seed(0)
cfg = WanConfig.preset("tiny").replace(num_layers=1, max_frames=12)
model = CausalWan(cfg, attention="sdpa").eval()
ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
t = time.perf_counter()
engine = Engine(model, mode=sys.argv[1], backend="eager", inductor="once", progress=False)
engine.prewarm()
with torch.no_grad():
    video = engine.generate(ctx, 4, seed=1)
print(json.dumps({"start_s": round(time.perf_counter() - t, 2), "graphs": engine.num_graphs,
                  "compiles": counters["stats"]["unique_graphs"], "checksum": float(video.double().sum())}))
"""


def main(path: str) -> None:
    cache = tempfile.mkdtemp(prefix="graphrt-once-inductor-")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = {"what": __doc__.split("\n")[0], "command": "PYTHONPATH=. python " + " ".join(sys.argv),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "load_average_start": list(os.getloadavg()), "modes": {}}
    for mode in ("forward", "chunk"):
        runs = []
        for start in ("first", "second"):
            proc = subprocess.run([sys.executable, "-c", ONE, mode], env=env, capture_output=True, text=True,
                                  timeout=1800)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            runs.append(dict(json.loads(proc.stdout.strip().splitlines()[-1]), start=start))
            print(mode, runs[-1], file=sys.stderr)
        out["modes"][mode] = runs
    out["load_average_end"] = list(os.getloadavg())
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
