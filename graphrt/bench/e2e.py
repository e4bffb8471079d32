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
as a graph over static feature caches) and timed again, alone and overlapped.

Every decode row is measured for each decoder: the Wan VAE and, beside it, the tiny TAEHV-compatible
decoder (:class:`~graphrt.pipeline.TinyDecoder`, captured a whole chunk at a time; random weights
unless ``--decoder-weights``: its timing does not depend on them). With the tiny decoder the DiT
and the Wan VAE work in its 16 latent channels. The last line printed is JSON.
Timings are wall clock (``perf_counter``; CUDA synchronized at each chunk boundary of the
one-part rows only) with the process CPU seconds beside them: on the CPU, overlap needs a free core.
The decode-only rows also give the decoding thread's CPU time (``thread_time``), the measure that a
loaded machine disturbs least.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch
from rich.console import Console
from rich.table import Table

from graphrt.bench.timing import process_cpu, sync, wall
from graphrt.capture import check as check_host_reads
from graphrt.errors import ConfigError, GraphrtError, missing_extra
from graphrt.pipeline.engine import Engine
from graphrt.pipeline.taehv import LATENT_CHANNELS, TinyDecoder, load_tiny_decoder
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
    decoder: str = "both"                  # "wan", "tiny" or "both"
    decoder_weights: str = "random"        # the tiny decoder's taew2_1 file, or random weights

    def resolve(self):
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = self.preset if self.preset != "auto" else ("wan-1.3b-480p" if device.type == "cuda" else "tiny")
        if name not in PRESETS:
            raise ConfigError(f"unknown e2e preset {name!r}", expected=sorted(PRESETS) + ["auto"], got=name)
        if self.chunks is not None and self.chunks < 2:
            raise ConfigError("the e2e bench needs >= 2 chunks (the first chunk is not steady)", got=self.chunks)
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError("repeats must be >= 1", got=self.repeats)
        if self.decoder not in ("wan", "tiny", "both"):
            raise ConfigError(f"unknown decoder {self.decoder!r}", expected=["wan", "tiny", "both"], got=self.decoder)
        return name, PRESETS[name], device


def _components(preset: E2EPreset, chunks: int, device, dtype, seed: int, latent_channels: int | None = None):
    shape = VideoShape(preset.shape.height, preset.shape.width, preset.shape.chunk_frames, chunks,
                       preset.shape.text_len)
    spec = preset.spec
    if latent_channels is not None:
        spec = replace(spec, dit_overrides=spec.dit_overrides + (("in_dim", latent_channels),
                                                                 ("out_dim", latent_channels)))
    return tiny_wan(shape, spec, seed=seed, dtype=dtype, device=device)


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
def _time_decode(decoder, latents, device, cpu: list | None = None) -> list[float]:
    """Wall ms per chunk of one video's decode; ``cpu`` gets the thread's CPU ms per chunk."""
    state, row, cpu_row = decoder.new_state(), [], []
    for z in latents:
        sync(device)
        c0, t0 = time.thread_time(), wall()
        decoder.decode(z, state).cpu()
        sync(device)
        row.append((wall() - t0) * 1e3)
        cpu_row.append((time.thread_time() - c0) * 1e3)
    decoder.release(state)
    if cpu is not None:
        cpu.append(cpu_row)
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
def _measure_decoder(decoder, engine, text, latents, dit_ms, cfg, chunks, repeats, device, log) -> dict:
    """Every decode row of one decoder: alone (eager, captured), in the pipeline sequential and
    overlapped, its host reads."""
    name = type(decoder).__name__
    wcfg = engine.cfg
    pipes = {label: VideoPipeline(engine, text, decoder, overlap=label != "sequential")
             for label in ("sequential", "overlapped")}
    _time_decode(decoder, latents, device)        # untimed: warms every path up
    for pipe in pipes.values():
        _time_pipe(pipe, chunks, 1, cfg.seed)
    log(f"timing {name} alone")
    cpu_rows, graph_cpu_rows = [], []
    dec_rows = [_time_decode(decoder, latents, device, cpu_rows) for _ in range(repeats)]
    paths, videos = {}, {}
    for label, pipe in pipes.items():
        log(f"timing {label} with {name}")
        paths[label], videos[label] = _time_pipe(pipe, chunks, repeats, cfg.seed)
    state = decoder.new_state()
    decoder.decode(latents[0], state)
    reads = check_host_reads(decoder.decode, latents[1], state)
    decoder.release(state)
    log(f"capturing {name}")
    t0 = wall()
    chunk = {"frames": wcfg.chunk_frames} if isinstance(decoder, TinyDecoder) else {}    # a whole chunk
    decoder.capture(wcfg.height, wcfg.width, **chunk)
    capture_s = wall() - t0
    _time_decode(decoder, latents, device)
    graph_rows = [_time_decode(decoder, latents, device, graph_cpu_rows) for _ in range(repeats)]
    log(f"timing overlapped with the captured {name}")
    _time_pipe(pipes["overlapped"], chunks, 1, cfg.seed)
    paths["overlapped+decoder-graph"], videos["overlapped+decoder-graph"] = _time_pipe(
        pipes["overlapped"], chunks, repeats, cfg.seed)
    for pipe in pipes.values():
        pipe.queue.close()
    same = {label: all(torch.equal(a, b) for a, b in zip(videos["sequential"], v))
            for label, v in videos.items() if label != "sequential"}
    dec_ms, graph_ms = _median_steady(dec_rows), _median_steady(graph_rows)
    seq, ovl = paths["sequential"], paths["overlapped"]
    steady = [x for video in cpu_rows for x in video[1:]]
    return {
        "decoder": name,
        "frames_per_steady_chunk": decoder.frames_out(wcfg.chunk_frames, first=False),
        "decode_ms": dec_ms,
        "decode_cpu_ms": statistics.median(steady),
        "decode_cpu_ms_range": [min(steady), max(steady)],
        "decode_graph_ms": graph_ms,
        "decode_graph_cpu_ms": _median_steady(graph_cpu_rows),
        "decoder_capture_s": capture_s,
        "decode_share": dec_ms / (dit_ms + dec_ms),
        "ideal_overlapped_ms": max(dit_ms, dec_ms),
        **paths,
        "overlap_speedup": seq["video_ms"] / ovl["video_ms"],
        "overlap_equals_sequential": all(same.values()),
        "decoder_host_reads": reads.count,
    }


@torch.no_grad()
def run(cfg: E2EConfig, log=lambda msg: None) -> dict:
    """Measure every path on one model, for each decoder, and return the JSON summary: the Wan
    VAE's rows at the top level (when measured), each decoder's under ``decoders``."""
    name, preset, device = cfg.resolve()
    chunks = cfg.chunks or preset.shape.chunks
    repeats = cfg.repeats or preset.repeats
    mode = cfg.mode or (preset.mode if device.type == "cuda" else "eager")
    dtype = getattr(torch, preset.dtype)
    log(f"building {name} on {device}")
    labels = ("wan", "tiny") if cfg.decoder == "both" else (cfg.decoder,)
    parts = _components(preset, chunks, device, dtype, cfg.seed, LATENT_CHANNELS if "tiny" in labels else None)
    wcfg = parts.dit.cfg
    engine = Engine(parts.dit, mode=mode, progress=False)
    text = TextEncoder(parts.text_encoder, parts.tokenizer, max_length=wcfg.text_len)
    log("capturing the DiT" if mode != "eager" else "warming up")
    engine.prewarm()
    ctx = text(PROMPT)
    latents = list(engine.stream(ctx, chunks, seed=cfg.seed))      # one untimed video warms the DiT up
    log("timing the DiT alone")
    dit_rows = [_time_dit(engine, ctx, chunks, cfg.seed, device) for _ in range(repeats)]
    dit_ms = _median_steady(dit_rows)
    decoders = {}
    for label in labels:
        decoder = WanVAEDecoder(parts.vae) if label == "wan" else \
            load_tiny_decoder(cfg.decoder_weights, device=device, dtype=dtype)
        decoders[label] = _measure_decoder(decoder, engine, text, latents, dit_ms, cfg, chunks, repeats, device, log)
    first = decoders[labels[0]]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": name,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": {"dit": {"dim": wcfg.dim, "layers": wcfg.num_layers, "latent": [wcfg.height, wcfg.width],
                           "latent_channels": wcfg.out_dim},
                   "vae": {"base_dim": parts.vae.config.base_dim, "dim_mult": list(parts.vae.config.dim_mult),
                           "num_res_blocks": parts.vae.config.num_res_blocks},
                   "tiny_decoder_weights": cfg.decoder_weights if "tiny" in labels else None,
                   "frame_size": [preset.shape.height, preset.shape.width], "chunk_frames": wcfg.chunk_frames,
                   "frames_per_steady_chunk": first["frames_per_steady_chunk"], "chunks": chunks,
                   "repeats": repeats, "dtype": preset.dtype, "mode": mode, "steps": len(engine.schedule.steps)},
        "dit_ms": dit_ms,
        **{k: v for k, v in decoders.get("wan", {}).items() if k not in ("decoder", "frames_per_steady_chunk")},
        "decoders": decoders,
    }


def table(s: dict) -> Table:
    c = s["config"]
    t = Table(title=f"graphrt.bench.e2e: {s['preset']} on {s['device']}, torch {s['torch']} "
                    f"({c['frame_size'][0]}x{c['frame_size'][1]}, {c['chunks']} chunks of {c['chunk_frames']} latent "
                    f"frames = {c['frames_per_steady_chunk']} frames each, {c['dtype']}, engine mode {c['mode']})")
    for col in ("path", "ms / chunk", "CPU ms / chunk", "first chunk ms", "video ms", "frames", "FPS",
                "CPU s / video"):
        t.add_column(col, justify="left" if col == "path" else "right")
    fps_of = c["frames_per_steady_chunk"] * 1e3
    t.add_row("DiT only", f"{s['dit_ms']:.2f}", "", "", "", "", f"{fps_of / s['dit_ms']:.1f}", "")
    captions = []
    for label, d in s["decoders"].items():
        t.add_section()
        t.add_row(f"{label}: decode only", f"{d['decode_ms']:.2f}", f"{d['decode_cpu_ms']:.2f}", "", "", "",
                  f"{fps_of / d['decode_ms']:.1f}", "")
        t.add_row(f"{label}: decode only, graph", f"{d['decode_graph_ms']:.2f}", f"{d['decode_graph_cpu_ms']:.2f}",
                  "", "", "", f"{fps_of / d['decode_graph_ms']:.1f}", "")
        for path in ("sequential", "overlapped", "overlapped+decoder-graph"):
            r = d[path]
            t.add_row(f"{label}: {path}", f"{r['chunk_ms_steady']:.2f}", "", f"{r['first_chunk_ms']:.2f}",
                      f"{r['video_ms']:.1f}", str(r["frames"]), f"{r['fps']:.1f}", f"{r['cpu_s_per_video']:.2f}")
        t.add_row(f"{label}: ideal overlap", f"{d['ideal_overlapped_ms']:.2f}", "", "", "", "", "", "")
        captions.append(f"{label} ({d['decoder']}): decode share {100 * d['decode_share']:.0f}% of a sequential chunk, "
                        f"overlap {d['overlap_speedup']:.2f}x end to end, overlapped frames == sequential frames: "
                        f"{d['overlap_equals_sequential']}, host reads per chunk: {d['decoder_host_reads']}")
    t.caption = "; ".join(captions) + (f"; load average {s['load_average'][0]:.1f} over {os.cpu_count()} CPUs"
                                       if s.get("load_average") else "")
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
    p.add_argument("--decoder", choices=["wan", "tiny", "both"], default="both",
                   help="decoders to measure (default both: the tiny one beside the Wan VAE)")
    p.add_argument("--decoder-weights", default="random", metavar="PATH",
                   help="the tiny decoder's taew2_1 file (default: random weights; the timing does not depend on them)")
    opts = p.parse_args(argv)
    problem = missing_extra("python -m graphrt.bench.e2e", "video")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if opts.threads:
        torch.set_num_threads(opts.threads)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200, stderr=False)
    cfg = E2EConfig(preset=opts.preset, device=opts.device, chunks=opts.chunks, repeats=opts.repeats,
                    mode=opts.mode, seed=opts.seed, decoder=opts.decoder, decoder_weights=opts.decoder_weights)
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
    return 0 if all(d["overlap_equals_sequential"] for d in summary["decoders"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
