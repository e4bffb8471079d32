"""``python -m graphrt.bench.e2e``: prompt to frames, the VAE in the FPS, with and without overlap.

One run, one model, one prompt and seed; per chunk (medians over the steady chunks of every
timed video):

- ``dit``: the Engine's chunk alone (denoising forwards + cache pass);
- ``decode``: the streaming VAE decode of one chunk alone (its causal feature cache kept);
- ``sequential``: prompt -> frames on the host with each chunk denoised, then decoded;
- ``overlapped``: the same, the decode of chunk n running beside the DiT's chunk n+1
  (a worker thread; on CUDA a second stream);

with end-to-end ms per chunk, frames per second over whole videos, the decode's share of the
sequential chunk (decode / (dit + decode)), and the overlapped gain. The decoder is also run
under :func:`graphrt.check`: its host reads are reported. The last line printed is JSON.
Timings are wall clock (``perf_counter``; CUDA synchronized at each chunk boundary of the
one-part rows only) with the process CPU seconds beside them: on the CPU, overlap needs a free core.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from rich.console import Console
from rich.table import Table

from graphrt.errors import ConfigError, GraphrtError
from graphrt.pipeline.tiny import RandomSpec, tiny_wan
from graphrt.pipeline.weights import VideoShape


@dataclass(frozen=True)
class E2EPreset:
    spec: RandomSpec
    shape: VideoShape
    dtype: str = "float32"
    mode: str = "eager"              # Engine mode
    repeats: int = 2                 # timed videos per path


PRESETS = {
    # 64x64 frames: a tiny DiT and VAE, seconds on a CPU
    "tiny": E2EPreset(RandomSpec(), VideoShape(64, 64, 3, 4, 16)),
    # 128x128 frames, Wan's VAE layout at a quarter of its width, a 4-layer 256-dim DiT
    "cpu-small": E2EPreset(RandomSpec("tiny", (("dim", 256), ("ffn_dim", 1024), ("num_layers", 4), ("text_dim", 64)),
                                      24, (1, 2, 4, 4), vae_res_blocks=2),
                           VideoShape(128, 128, 3, 4, 16), repeats=2),
    # Wan 2.1 1.3B's DiT and VAE at 480x832 (random weights), bf16, one graph per chunk
    "wan-1.3b-480p": E2EPreset(RandomSpec("wan-1.3b", (), 96, (1, 2, 4, 4), vae_res_blocks=2, text_layers=1),
                               VideoShape(480, 832, 3, 7, 512), dtype="bfloat16", mode="chunk", repeats=2),
}

PROMPT = "a red fox runs through the snow in a forest at night"


@dataclass
class E2EConfig:
    preset: str = "auto"
    device: str | None = None
    chunks: int | None = None
    repeats: int | None = None
    mode: str | None = None
    seed: int = 0

    def resolve(self):
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = self.preset if self.preset != "auto" else ("wan-1.3b-480p" if device.type == "cuda" else "tiny")
        if name not in PRESETS:
            raise ConfigError(f"unknown e2e preset {name!r}", expected=sorted(PRESETS) + ["auto"], got=name)
        if self.chunks is not None and self.chunks < 2:
            raise ConfigError("the e2e bench needs >= 2 chunks (the first chunk is not steady)", got=self.chunks)
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError("repeats must be >= 1", got=self.repeats)
        return name, PRESETS[name], device


def _components(preset: E2EPreset, chunks: int, device, dtype, seed: int):
    shape = VideoShape(preset.shape.height, preset.shape.width, preset.shape.chunk_frames, chunks,
                       preset.shape.text_len)
    return tiny_wan(shape, preset.spec, seed=seed, dtype=dtype, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_steady(rows: list[list[float]]) -> float:
    """Median over every chunk but each video's first (which also opens the session)."""
    return statistics.median(x for video in rows for x in video[1:])


def run(cfg: E2EConfig, log=lambda msg: None) -> dict:
    """Measure every path on one model and return the JSON summary."""
    import graphrt
    from graphrt.pipeline.decode import WanVAEDecoder
    from graphrt.pipeline.engine import Engine
    from graphrt.pipeline.text import TextEncoder
    from graphrt.pipeline.video_pipeline import VideoPipeline

    name, preset, device = cfg.resolve()
    chunks = cfg.chunks or preset.shape.chunks
    repeats = cfg.repeats or preset.repeats
    mode = cfg.mode or (preset.mode if device.type == "cuda" else "eager")
    dtype = getattr(torch, preset.dtype)
    log(f"building {name} on {device}")
    parts = _components(preset, chunks, device, dtype, cfg.seed)
    engine = Engine(parts.dit, mode=mode, progress=False)
    text = TextEncoder(parts.text_encoder, parts.tokenizer, max_length=parts.dit.cfg.text_len)
    decoder = WanVAEDecoder(parts.vae)
    pipes = {ov: VideoPipeline(engine, text, decoder, overlap=ov) for ov in (False, True)}
    log("capturing" if mode != "eager" else "warming up")
    engine.prewarm()
    ctx = text(PROMPT)[None, 0].to(device)
    latents = []
    for video in range(repeats + 1):                       # video 0 warms up every path, untimed
        latents = list(engine.stream(ctx, chunks, seed=cfg.seed))
        state = decoder.new_state()
        for z in latents:
            decoder.decode(z, state)
        for pipe in pipes.values():
            for _ in pipe.stream(PROMPT, chunks, seed=cfg.seed):
                pass
    # -- each part alone -----------------------------------------------------------------------
    log("timing the DiT and the decoder alone")
    dit_rows, dec_rows = [], []
    with torch.no_grad():
        for _ in range(repeats):
            row = []
            _sync(device)
            t0 = time.perf_counter()
            for _ in engine.stream(ctx, chunks, seed=cfg.seed):
                _sync(device)
                now = time.perf_counter()
                row.append((now - t0) * 1e3)
                t0 = now
            dit_rows.append(row)
            state, row = decoder.new_state(), []
            for z in latents:
                _sync(device)
                t0 = time.perf_counter()
                decoder.decode(z, state).cpu()
                _sync(device)
                row.append((time.perf_counter() - t0) * 1e3)
            dec_rows.append(row)
    # -- end to end ------------------------------------------------------------------------------
    paths = {}
    videos = {}
    for overlap, pipe in pipes.items():
        label = "overlapped" if overlap else "sequential"
        log(f"timing {label}")
        rows, walls, cpus, frames = [], [], [], 0
        for _ in range(repeats):
            _sync(device)
            row, out = [], []
            c0, t0 = time.process_time(), time.perf_counter()
            last = t0
            for f in pipe.stream(PROMPT, chunks, seed=cfg.seed):
                now = time.perf_counter()
                row.append((now - last) * 1e3)
                last = now
                out.append(f)
            walls.append(last - t0)
            cpus.append(time.process_time() - c0)
            rows.append(row)
            frames = sum(len(f) for f in out)
            videos[label] = out
        wall = statistics.median(walls)
        paths[label] = {"chunk_ms_median": _median_steady(rows), "first_chunk_ms": statistics.median(r[0] for r in rows),
                        "video_ms": wall * 1e3, "frames": frames, "fps": frames / wall,
                        "cpu_s_per_video": statistics.median(cpus)}
    for p in pipes.values():
        p.queue.close()
    same = all(torch.equal(a, b) for a, b in zip(videos["sequential"], videos["overlapped"]))
    dit_ms, dec_ms = _median_steady(dit_rows), _median_steady(dec_rows)
    state = decoder.new_state()
    decoder.decode(latents[0], state)
    reads = graphrt.check(decoder.decode, latents[1], state)
    frames_steady = decoder.frames_out(parts.dit.cfg.chunk_frames, first=False)
    seq, ovl = paths["sequential"], paths["overlapped"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": name,
        "config": {"dit": {"dim": parts.dit.cfg.dim, "layers": parts.dit.cfg.num_layers,
                           "latent": [parts.dit.cfg.height, parts.dit.cfg.width]},
                   "vae": {"base_dim": parts.vae.config.base_dim, "dim_mult": list(parts.vae.config.dim_mult),
                           "num_res_blocks": parts.vae.config.num_res_blocks},
                   "frame_size": [preset.shape.height, preset.shape.width], "chunk_frames": parts.dit.cfg.chunk_frames,
                   "frames_per_steady_chunk": frames_steady, "chunks": chunks, "repeats": repeats,
                   "dtype": preset.dtype, "mode": mode, "steps": len(engine.schedule.steps)},
        "dit_ms": dit_ms,
        "decode_ms": dec_ms,
        "decode_share": dec_ms / (dit_ms + dec_ms),
        "ideal_overlapped_ms": max(dit_ms, dec_ms),
        "sequential": seq,
        "overlapped": ovl,
        "overlap_speedup": seq["video_ms"] / ovl["video_ms"],
        "overlap_equals_sequential": same,
        "decoder_host_reads": reads.count,
    }


def table(s: dict) -> Table:
    c = s["config"]
    t = Table(title=f"graphrt.bench.e2e: {s['preset']} on {s['device']}, torch {s['torch']} "
                    f"({c['frame_size'][0]}x{c['frame_size'][1]}, {c['chunks']} chunks of {c['chunk_frames']} latent "
                    f"frames = {c['frames_per_steady_chunk']} frames each, {c['dtype']}, engine mode {c['mode']})")
    for col in ("path", "ms / chunk", "first chunk ms", "video ms", "frames", "FPS", "CPU s / video"):
        t.add_column(col, justify="left" if col == "path" else "right")
    fps_of = c["frames_per_steady_chunk"] * 1e3
    t.add_row("DiT only", f"{s['dit_ms']:.2f}", "", "", "", f"{fps_of / s['dit_ms']:.1f}", "")
    t.add_row("decode only", f"{s['decode_ms']:.2f}", "", "", "", f"{fps_of / s['decode_ms']:.1f}", "")
    for label in ("sequential", "overlapped"):
        r = s[label]
        t.add_row(label, f"{r['chunk_ms_median']:.2f}", f"{r['first_chunk_ms']:.2f}", f"{r['video_ms']:.1f}",
                  str(r["frames"]), f"{r['fps']:.1f}", f"{r['cpu_s_per_video']:.2f}")
    t.add_row("ideal overlap", f"{s['ideal_overlapped_ms']:.2f}", "", "", "", "", "")
    t.caption = (f"decode share {100 * s['decode_share']:.0f}% of a sequential chunk; overlap {s['overlap_speedup']:.2f}x "
                 f"end to end; overlapped frames == sequential frames: {s['overlap_equals_sequential']}; decoder host "
                 f"reads per chunk: {s['decoder_host_reads']}")
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphrt.bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="auto: tiny on the CPU, wan-1.3b-480p on CUDA")
    p.add_argument("--chunks", type=int, help="chunks per video (default: the preset's)")
    p.add_argument("--repeats", type=int, help="timed videos per path (default: the preset's)")
    p.add_argument("--mode", choices=["eager", "forward", "chunk"],
                   help="engine mode (default: the preset's on CUDA, eager on the CPU)")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", dest="json_path", help="also write the JSON summary here")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200, stderr=False)
    cfg = E2EConfig(preset=opts.preset, device=opts.device, chunks=opts.chunks, repeats=opts.repeats,
                    mode=opts.mode, seed=opts.seed)
    try:
        summary = run(cfg, log=lambda m: print(f"  {m}", file=sys.stderr))
    except GraphrtError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    console.print(table(summary))
    if opts.json_path:
        with open(opts.json_path, "w") as f:
            json.dump(summary, f, indent=2)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0 if summary["overlap_equals_sequential"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
