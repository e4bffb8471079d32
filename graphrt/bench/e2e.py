"""``python -m graphrt.bench.e2e``: prompt to frames, the VAE in the FPS, with and without overlap.

One run, one model, one prompt and seed; per chunk (over the steady chunks, every chunk but a
video's first, of every timed video: medians for the parts alone, the mean interval between
chunks reaching the host for the end-to-end paths):

- ``dit``: the Engine's chunk alone (denoising forwards + cache pass);
- ``decode``: the streaming VAE decode of one chunk alone (its causal feature cache kept);
- ``sequential``: prompt -> frames on the host with each chunk denoised, then decoded;
- ``overlapped``: the same, the decode of chunk n running beside the DiT's chunk n+1
  (a worker thread; on CUDA a second stream);

with end-to-end ms per chunk, frames per second over whole videos, the decode's share of the
sequential chunk (decode / (dit + decode)), and the overlapped gain. The decoder is also run
under :func:`graphrt.check` (its host reads are reported), then captured (its steady latent frame
as a graph over static feature caches) and timed again, alone and overlapped. The last line
printed is JSON.
Timings are wall clock (``perf_counter``; CUDA synchronized at each chunk boundary of the
one-part rows only) with the process CPU seconds beside them: on the CPU, overlap needs a free core.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from rich.console import Console
from rich.table import Table

from graphrt.bench.timing import process_cpu, sync, wall
from graphrt.capture import check as check_host_reads
from graphrt.errors import ConfigError, GraphrtError, missing_extra
from graphrt.pipeline.engine import Engine
from graphrt.pipeline.text import TextEncoder
from graphrt.pipeline.tiny import RandomSpec, tiny_wan
from graphrt.pipeline.vae import WanVAEDecoder
from graphrt.pipeline.video_pipeline import VideoPipeline
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
    # 128x128 frames: an 8-layer 512-dim DiT, Wan's VAE layout at 1/12 of its width, the decode about
    # as long as the DiT's chunk on a CPU core (on a GPU at 480p, a share of it: bench/results/design-numbers.md)
    "cpu-small": E2EPreset(RandomSpec("tiny", (("dim", 512), ("ffn_dim", 2048), ("num_heads", 8), ("num_layers", 8),
                                               ("text_dim", 64)), 8, (1, 2, 4, 4)),
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


def _median_steady(rows: list[list[float]]) -> float:
    """Median over every chunk but each video's first (which also opens the session)."""
    return statistics.median(x for video in rows for x in video[1:])


@torch.no_grad()
def _time_dit(engine, ctx, chunks, seed, device) -> list[float]:
    row = []
    sync(device)
    t0 = wall()
    for _ in engine.stream(ctx, chunks, seed=seed):
        sync(device)
        now = wall()
        row.append((now - t0) * 1e3)
        t0 = now
    return row


@torch.no_grad()
def _time_decode(decoder, latents, device) -> list[float]:
    state, row = decoder.new_state(), []
    for z in latents:
        sync(device)
        t0 = wall()
        decoder.decode(z, state).cpu()
        sync(device)
        row.append((wall() - t0) * 1e3)
    decoder.release(state)
    return row


def _time_pipe(pipe, chunks, repeats, seed) -> tuple[dict, list]:
    """Time between frames reaching the host, per chunk, over ``repeats`` videos."""
    rows, walls, cpus = [], [], []
    for _ in range(repeats):
        row, out = [], []
        c0, t0 = process_cpu(), wall()
        last = t0
        for f in pipe.stream(PROMPT, chunks, seed=seed):
            now = wall()
            row.append((now - last) * 1e3)
            last = now
            out.append(f)
        walls.append(last - t0)
        cpus.append(process_cpu() - c0)
        rows.append(row)
    frames, video_s = sum(len(f) for f in out), statistics.median(walls)
    # the mean of the steady intervals: with overlap, frames may reach the host in bursts
    steady = statistics.median(sum(r[1:]) / (len(r) - 1) for r in rows)
    return {"chunk_ms_steady": steady, "first_chunk_ms": statistics.median(r[0] for r in rows),
            "video_ms": video_s * 1e3, "frames": frames, "fps": frames / video_s,
            "cpu_s_per_video": statistics.median(cpus)}, out


@torch.no_grad()
def run(cfg: E2EConfig, log=lambda msg: None) -> dict:
    """Measure every path on one model and return the JSON summary."""
    name, preset, device = cfg.resolve()
    chunks = cfg.chunks or preset.shape.chunks
    repeats = cfg.repeats or preset.repeats
    mode = cfg.mode or (preset.mode if device.type == "cuda" else "eager")
    dtype = getattr(torch, preset.dtype)
    log(f"building {name} on {device}")
    parts = _components(preset, chunks, device, dtype, cfg.seed)
    wcfg = parts.dit.cfg
    engine = Engine(parts.dit, mode=mode, progress=False)
    text = TextEncoder(parts.text_encoder, parts.tokenizer, max_length=wcfg.text_len)
    decoder = WanVAEDecoder(parts.vae)
    pipes = {label: VideoPipeline(engine, text, decoder, overlap=label != "sequential")
             for label in ("sequential", "overlapped")}
    log("capturing the DiT" if mode != "eager" else "warming up")
    engine.prewarm()
    ctx = text(PROMPT)
    latents = list(engine.stream(ctx, chunks, seed=cfg.seed))      # one untimed video warms every path up
    _time_decode(decoder, latents, device)
    for pipe in pipes.values():
        _time_pipe(pipe, chunks, 1, cfg.seed)
    log("timing the DiT and the decoder alone")
    dit_rows = [_time_dit(engine, ctx, chunks, cfg.seed, device) for _ in range(repeats)]
    dec_rows = [_time_decode(decoder, latents, device) for _ in range(repeats)]
    paths, videos = {}, {}
    for label, pipe in pipes.items():
        log(f"timing {label}")
        paths[label], videos[label] = _time_pipe(pipe, chunks, repeats, cfg.seed)
    state = decoder.new_state()
    decoder.decode(latents[0], state)
    reads = check_host_reads(decoder.decode, latents[1], state)
    # the decoder captured: one graph per steady latent frame over static feature caches
    log("capturing the decoder")
    t0 = wall()
    decoder.capture(wcfg.height, wcfg.width)
    capture_s = wall() - t0
    _time_decode(decoder, latents, device)
    graph_rows = [_time_decode(decoder, latents, device) for _ in range(repeats)]
    log("timing overlapped with the captured decoder")
    _time_pipe(pipes["overlapped"], chunks, 1, cfg.seed)
    paths["overlapped+decoder-graph"], videos["overlapped+decoder-graph"] = _time_pipe(
        pipes["overlapped"], chunks, repeats, cfg.seed)
    for pipe in pipes.values():
        pipe.queue.close()
    same = {label: all(torch.equal(a, b) for a, b in zip(videos["sequential"], v))
            for label, v in videos.items() if label != "sequential"}
    dit_ms, dec_ms, graph_ms = _median_steady(dit_rows), _median_steady(dec_rows), _median_steady(graph_rows)
    seq, ovl = paths["sequential"], paths["overlapped"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": name,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {"dit": {"dim": wcfg.dim, "layers": wcfg.num_layers, "latent": [wcfg.height, wcfg.width]},
                   "vae": {"base_dim": parts.vae.config.base_dim, "dim_mult": list(parts.vae.config.dim_mult),
                           "num_res_blocks": parts.vae.config.num_res_blocks},
                   "frame_size": [preset.shape.height, preset.shape.width], "chunk_frames": wcfg.chunk_frames,
                   "frames_per_steady_chunk": decoder.frames_out(wcfg.chunk_frames, first=False), "chunks": chunks,
                   "repeats": repeats, "dtype": preset.dtype, "mode": mode, "steps": len(engine.schedule.steps)},
        "dit_ms": dit_ms,
        "decode_ms": dec_ms,
        "decode_graph_ms": graph_ms,
        "decoder_capture_s": capture_s,
        "decode_share": dec_ms / (dit_ms + dec_ms),
        "ideal_overlapped_ms": max(dit_ms, dec_ms),
        **paths,
        "overlap_speedup": seq["video_ms"] / ovl["video_ms"],
        "overlap_equals_sequential": all(same.values()),
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
    t.add_row("decode only, graph", f"{s['decode_graph_ms']:.2f}", "", "", "", f"{fps_of / s['decode_graph_ms']:.1f}", "")
    for label in ("sequential", "overlapped", "overlapped+decoder-graph"):
        r = s[label]
        t.add_row(label, f"{r['chunk_ms_steady']:.2f}", f"{r['first_chunk_ms']:.2f}", f"{r['video_ms']:.1f}",
                  str(r["frames"]), f"{r['fps']:.1f}", f"{r['cpu_s_per_video']:.2f}")
    t.add_row("ideal overlap", f"{s['ideal_overlapped_ms']:.2f}", "", "", "", "", "")
    t.caption = (f"decode share {100 * s['decode_share']:.0f}% of a sequential chunk; overlap {s['overlap_speedup']:.2f}x "
                 f"end to end; overlapped frames == sequential frames: {s['overlap_equals_sequential']}; decoder host "
                 f"reads per chunk: {s['decoder_host_reads']}"
                 + (f"; load average {s['load_average'][0]:.1f} over {os.cpu_count()} CPUs" if s.get("load_average") else ""))
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
    problem = missing_extra("python -m graphrt.bench.e2e", "video")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
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
