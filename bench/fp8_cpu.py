"""FP8 linears on the CPU: error of the latents of a whole video (and per chunk) and the time of
one chunk's forward, bf16 against fp8 (graphrt.quantize), random weights.

    PYTHONPATH=. python bench/fp8_cpu.py [tiny|cpu-small ...]

Times: one torch thread, time.thread_time of one DiT forward (one chunk, batch 1, no cache
reuse), median over repeats with min/max. The CPU runs _scaled_mm in software (an emulation of
the fp8 GEMM, not a fast kernel): these times say nothing about an H100.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

import graphrt
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine
from graphrt.quant import weight_bytes
from graphrt.tolerance import max_rel_err, rms_rel_err

PRESETS = {  # (config, video chunks, timing repeats)
    "tiny": (WanConfig.preset("tiny"), 3, 41),
    # the DiT of graphrt.bench.e2e's cpu-small preset (128x128 frames: a 16x16 latent)
    "cpu-small": (WanConfig.preset("tiny", dim=512, ffn_dim=2048, num_heads=8, num_layers=8, text_dim=64,
                                   height=16, width=16), 3, 9),
}


def _video(model, ctx, chunks):
    return Engine(model, mode="eager", progress=False).generate(ctx, chunks, seed=3).float()


def _inputs(cfg, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, generator=g).to(dtype)
    return x, torch.full((1,), 500.0), torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dtype)


def _forward(model, cfg, dtype):
    with torch.no_grad():
        return model(*_inputs(cfg, dtype)).float()


def _time(model, cfg, dtype, repeats):
    x, t, ctx = _inputs(cfg, dtype)
    out = []
    with torch.no_grad():
        model(x, t, ctx)
        for _ in range(repeats):
            t0 = time.thread_time()
            model(x, t, ctx)
            out.append((time.thread_time() - t0) * 1e3)
    return statistics.median(out), min(out), max(out)


def run(name):
    cfg, chunks, repeats = PRESETS[name]
    torch.manual_seed(0)
    ref = CausalWan(cfg, attention="sdpa").eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    want, want_fwd = _video(ref, ctx, chunks), _forward(ref, cfg, torch.float32)
    f = cfg.chunk_frames
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        base = copy.deepcopy(ref).to(dtype)
        fp8 = copy.deepcopy(base)
        report = graphrt.quantize(fp8, "fp8")
        vb, vq = _video(base, ctx.to(dtype), chunks), _video(fp8, ctx.to(dtype), chunks)
        per_chunk = [rms_rel_err(vq[:, :, c * f:(c + 1) * f], vb[:, :, c * f:(c + 1) * f]) for c in range(chunks)]
        fb, fq = _forward(base, cfg, dtype), _forward(fp8, cfg, dtype)
        tb, tq = _time(base, cfg, dtype, repeats), _time(fp8, cfg, dtype, repeats)
        rows.append(dict(dtype=str(dtype).split(".")[-1], base_vs_fp32=(rms_rel_err(vb, want), max_rel_err(vb, want)),
                         fp8_vs_fp32=(rms_rel_err(vq, want), max_rel_err(vq, want)),
                         fp8_vs_base=(rms_rel_err(vq, vb), max_rel_err(vq, vb)), per_chunk=per_chunk,
                         forward=(rms_rel_err(fb, want_fwd), rms_rel_err(fq, want_fwd), rms_rel_err(fq, fb)),
                         ms_base=tb, ms_fp8=tq, bytes=(weight_bytes(base), weight_bytes(fp8)),
                         converted=len(report.converted)))
    return cfg, chunks, repeats, rows


def main(names):
    torch.set_num_threads(1)
    for name in names:
        cfg, chunks, repeats, rows = run(name)
        print(f"\n## {name}: dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
              f"latent {cfg.height}x{cfg.width}, {chunks} chunks of {cfg.chunk_frames} frames, "
              f"{rows[0]['converted']} linears in fp8\n")
        print("| model dtype | model vs fp32 (rms / max) | fp8 vs fp32 (rms / max) | fp8 vs same dtype (rms / max) "
              "| fp8 vs same dtype per chunk (rms) | weights MiB (model -> fp8) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            p = lambda e: f"{e[0]:.2e} / {e[1]:.2e}"  # noqa: E731
            print(f"| {r['dtype']} | {p(r['base_vs_fp32'])} | {p(r['fp8_vs_fp32'])} | {p(r['fp8_vs_base'])} | "
                  f"{', '.join(f'{e:.2e}' for e in r['per_chunk'])} | "
                  f"{r['bytes'][0] / 2**20:.2f} -> {r['bytes'][1] / 2**20:.2f} |")
        print("\nOne forward's output (velocity of one chunk, t=500), rms relative error:\n")
        print("| model dtype | model vs fp32 | fp8 vs fp32 | fp8 vs same dtype |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['dtype']} | " + " | ".join(f"{e:.2e}" for e in r["forward"]) + " |")
        print(f"\nOne chunk's DiT forward, CPU emulation, 1 thread, thread CPU ms, median [min-max] of {repeats}:\n")
        print("| model dtype | linears in model dtype | linears fp8 (_scaled_mm on the CPU) | fp8 / model |")
        print("|---|---|---|---|")
        for r in rows:
            b, q = r["ms_base"], r["ms_fp8"]
            print(f"| {r['dtype']} | {b[0]:.2f} [{b[1]:.2f}-{b[2]:.2f}] | {q[0]:.2f} [{q[1]:.2f}-{q[2]:.2f}] | "
                  f"{q[0] / b[0]:.2f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or list(PRESETS))
