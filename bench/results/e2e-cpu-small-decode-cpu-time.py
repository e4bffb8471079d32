"""Thread CPU ms per steady chunk, Wan VAE vs tiny decoder, cpu-small, 1 thread (bench.e2e's own helpers)."""
import json, os, statistics, sys, torch
from datetime import datetime, timezone
torch.set_num_threads(1)
from graphrt.bench.e2e import PRESETS, _components, _time_decode
from graphrt.pipeline import Engine, TextEncoder, WanVAEDecoder
from graphrt.pipeline.taehv import load_tiny_decoder
preset, chunks, videos = PRESETS["cpu-small"], 8, 3
parts = _components(preset, chunks, torch.device("cpu"), torch.float32, 0, 16)
engine = Engine(parts.dit, mode="eager", progress=False)
text = TextEncoder(parts.text_encoder, parts.tokenizer, max_length=parts.dit.cfg.text_len)
with torch.no_grad():
    latents = list(engine.stream(text("a red fox runs through the snow in a forest at night"), chunks, seed=0))
out = {"what": "thread CPU ms (time.thread_time) per steady chunk (every chunk but a video's first) of the "
               "eager decode alone, 3 latent frames -> 12 frames of 128x128, 16 latent channels, fp32, 1 thread",
       "command": "PYTHONPATH=. python " + " ".join(sys.argv),
       "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
       "load_average": list(os.getloadavg()), "chunks_per_video": chunks, "videos": videos}
for label, dec in (("wan", WanVAEDecoder(parts.vae)), ("tiny", load_tiny_decoder("random", device="cpu", dtype=torch.float32))):
    _time_decode(dec, latents, torch.device("cpu"))
    rows = []
    for _ in range(videos):
        _time_decode(dec, latents, torch.device("cpu"), rows)
    xs = sorted(x for r in rows for x in r[1:])
    out[label] = {"median_ms": statistics.median(xs), "min_ms": xs[0], "max_ms": xs[-1],
                  "p10_ms": xs[len(xs) // 10], "p90_ms": xs[(9 * len(xs)) // 10], "samples": len(xs)}
    print(label, out[label], file=sys.stderr)
out["tiny_speedup"] = out["wan"]["median_ms"] / out["tiny"]["median_ms"]
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out))
