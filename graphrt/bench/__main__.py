"""``python -m graphrt.bench``: every mode side by side in one run; the last line printed is JSON.

Exit status: 0 when every requested mode ran, 1 when a mode failed or was skipped (each one
named on stderr; the JSON line still comes last), 2 on bad arguments (one line on stderr,
before anything runs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from graphrt.bench.core import run
from graphrt.bench.presets import FUSED_MODES, LINEAR_DTYPES, MODES, PRESETS, BenchConfig
from graphrt.bench.result import ModeResult
from graphrt.bench.llm import PRESETS as LLM_PRESETS, is_llm_argv, main as llm_main
from graphrt.bench.output import check_output_path, one_line, save as save_outputs, stops_cleanly
from graphrt.attention import BACKENDS
from graphrt.errors import ConfigError, GraphrtError
from graphrt.kv import KV_DTYPES

# torch's own compile paths copy pytree specs and trip torch's deprecation of LeafSpec: noise in a
# report, nothing a user can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m graphrt.bench", description=__doc__)
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS, *LLM_PRESETS],
                   help="auto: tiny on the CPU, wan-1.3b-480p on CUDA; the llama-* presets bench LLM decode "
                        "(their options: python -m graphrt.bench.llm --help)")
    p.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all on CUDA; on the CPU "
                   f"all but {','.join(FUSED_MODES)}, whose ops run their aten reference there)")
    p.add_argument("--batch", type=int, default=1, help="videos generated together (sessions in one batch)")
    p.add_argument("--chunks", type=int, help="chunks per video (default: the preset's)")
    p.add_argument("--steps", type=int, help="denoising steps per chunk (default 4), plus the cache pass")
    p.add_argument("--layers", type=int, help="transformer layers (default: the preset's; fewer: a slice of the model)")
    p.add_argument("--repeats", type=int, help="extra videos timed after the first (steady-state samples)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the preset's")
    p.add_argument("--attention", default="auto", choices=["auto", *BACKENDS, "sdpa-auto"])
    p.add_argument("--linear-dtype", default="bf16", help=f"one of {', '.join(LINEAR_DTYPES)}; fp8: run each mode also with fp8 linears (Engine(linear_dtype='fp8')), a '<mode>:fp8' row "
                        "beside it with its error against that mode")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES),
                   help="store K/V quantized (default: the model dtype); reports bytes per session and the "
                        "error against the unquantized run")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on the CPU, for stable timings; "
                   "torch's own on CUDA)")
    p.add_argument("--cache-dir", help="keep graphrt's compiled graphs here across runs, and let the torch.compile "
                   "peers use inductor's own cache (default: fresh caches for both, removed after the run, so "
                   "capture and first-chunk times are cold; the warm column is a second engine on graphrt's)")
    p.add_argument("--kv-buckets", default="auto", choices=["auto", "per-length", "max"],
                   help="graphs per KV length (per-length) or one per batch size (max: whole slab, masked)")
    p.add_argument("--no-head-to-head", action="store_true",
                   help="on the CPU, skip the rerun of the fastest graph mode and the strongest peer in turn")
    p.add_argument("--checkpoint", help="a Wan 2.1 safetensors file or folder (default: random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="also write the JSON summary here")
    p.add_argument("--md", help="also write the table as markdown here")
    p.add_argument("--plot", help="draw speedup per mode to this image (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks: torchrun --nproc-per-node N -m "
                   "graphrt.bench --sp N (gloo on the CPU, NCCL on GPUs); every rank runs, rank 0 reports")
    return p.parse_args(argv)


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}{unit}" if abs(v) < 1e-2 else f"{v:,.2f}{unit}"
    return f"{v:,}{unit}"


def _mem(r: dict, fmt) -> str:
    """Peak MiB in the steady state / while capturing (CUDA only)."""
    steady, cap = r.get("peak_mem_bytes"), r.get("capture_peak_mem_bytes")
    if steady is None:
        return "-"
    return fmt(steady / 2 ** 20) + ("" if cap is None else " / " + fmt(cap / 2 ** 20))


def table(summary: dict) -> Table:
    c = summary["config"]
    t = Table(title=f"graphrt.bench: {summary['preset']} on {summary['device']}, torch {summary['torch']} "
                    f"({c['chunks']} chunks x ({c['steps']} steps + cache pass), batch {c['batch']}, {c['dtype']}, "
                    f"attention {c['attention']}, K/V {c.get('kv_dtype', c['dtype'])})")
    six = f"chunk {summary['comparison_point']['chunk']} ms" if "comparison_point" in summary else "chunk 6 ms"
    cols = [("mode", "left"), ("kernels", "left"), ("1st chunk ms", "right"), ("chunk ms", "right"), ("p90", "right"),
            (six, "right"), ("cpu ms", "right"),
            ("denoise", "right"), ("cache pass", "right"), ("fps", "right"), ("host reads", "right"),
            ("graphs", "right"), ("capture s", "right"), ("warm s", "right"), ("peak MiB steady/capture", "right"),
            ("GPU busy", "right"),
            ("err vs ref", "right"), ("x ref", "right"), ("x eager", "right"), ("attention kernel", "left"),
            ("fp8 err vs bf16 rms", "right")]
    for name, just in cols:
        t.add_column(name, justify=just)
    for mode, r in summary["modes"].items():
        if "skipped" in r:
            t.add_row(mode, f"[yellow]skipped: {escape(r['skipped'])}[/]", *[""] * (len(cols) - 2))
            continue
        mem = _mem(r, _fmt)
        busy = None if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        t.add_row(mode, kernels_cell(r), _fmt(r["first_chunk_ms"]), _fmt(r["chunk_ms_median"]),
                  _fmt(r["chunk_ms_p90"]), _fmt(r.get("chunk6_ms")), _fmt(r["chunk_cpu_ms_median"]),
                  _fmt(r["denoise_ms_median"]), _fmt(r["cache_pass_ms_median"]), _fmt(r["fps"]),
                  _fmt(r["host_reads_per_chunk"]), _fmt(r["graphs"]), _fmt(r["capture_s"]), _fmt(r["warm_capture_s"]),
                  mem, busy or "-",
                  _fmt(r["max_err_vs_reference"]), _fmt(r["speedup_vs_reference"], "x"),
                  _fmt(r["speedup_vs_eager"], "x"), r.get("attention_kernel") or "-", _fmt(r.get("rms_err_vs_bf16")))
    return t


def kernels_cell(r: dict) -> str:
    """A mode's kernel path, and for the fused path what its ops ran (on the CPU: the aten reference)."""
    path = r.get("kernel_path") or "-"
    return f"{path} ({r['fused_ops']})" if r.get("fused_ops") else path


def comparison_line(summary: dict) -> str | None:
    """The published comparison point, and each mode's median there (thread CPU time on the CPU)."""
    p = summary.get("comparison_point")
    if p is None:
        return None
    if not p["measured"]:
        return (f"- chunk {p['chunk']} (KV {p['kv_frames']} latent frames), {p['what']}: not measured, "
                f"the videos have fewer than {p['chunk']} chunks")
    key = "chunk6_cpu_ms" if summary["device"].startswith("cpu") else "chunk6_ms"
    times = ", ".join(f"{m} {r[key]:,.2f} ms" for m, r in summary["modes"].items()
                      if "skipped" not in r and r.get(key) is not None)
    return f"- chunk {p['chunk']} (KV {p['kv_frames']} latent frames), {p['what']}: {times}"


def markdown(summary: dict) -> str:
    """The summary as a markdown table with its config line and each mode's notes."""
    c = summary["config"]

    def f(v, digits=2):
        if v is None:
            return "-"
        if isinstance(v, float) and 0 < abs(v) < 1e-2:
            return f"{v:.2e}"
        return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)

    cpu = summary["device"].startswith("cpu")
    head = ["mode", "kernels", "first chunk ms", "chunk ms p50", "p90", "chunk 6 ms"] + \
        (["cpu ms p50", "cpu ms min/med/max", "chunk 6 cpu ms"] if cpu else []) + \
        ["denoise ms", "cache pass ms", "video fps", "host reads/chunk", "graphs", "capture s", "warm capture s",
         "peak MiB steady / capture", "GPU busy", "max err vs reference", "x reference", "x eager",
         "attention kernel", "fp8 err vs bf16 (rms / max)"]
    lines = [f"{summary['preset']} on {summary['device']}, torch {summary['torch']}: {c['chunks']} chunks x "
             f"({c['steps']} steps + cache pass), batch {c['batch']}, {c['dtype']}, attention {c['attention']}, K/V {c.get('kv_dtype', c['dtype'])}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for mode, r in summary["modes"].items():
        if "skipped" in r:
            lines.append(f"| {mode} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        mem = _mem(r, lambda v: f(v, 0))
        busy = None if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        spread = r.get("chunk_cpu_ms_spread")
        cells = [mode, kernels_cell(r), f(r["first_chunk_ms"]), f(r["chunk_ms_median"]), f(r["chunk_ms_p90"]),
                 f(r.get("chunk6_ms"))]
        if cpu:
            cells += [f(r["chunk_cpu_ms_median"]), "/".join(f(x) for x in spread) if spread else "-",
                      f(r.get("chunk6_cpu_ms"))]
        cells += [f(r["denoise_ms_median"]), f(r["cache_pass_ms_median"]), f(r["fps"], 1),
                  f(r["host_reads_per_chunk"], 0), f(r["graphs"]), f(r["capture_s"]), f(r["warm_capture_s"]),
                  mem, busy or "-", f(r["max_err_vs_reference"]), f(r["speedup_vs_reference"]) + "x",
                  f(r["speedup_vs_eager"]) + "x", r.get("attention_kernel") or "-",
                  "-" if r.get("rms_err_vs_bf16") is None else f"{f(r['rms_err_vs_bf16'])} / {f(r['max_err_vs_bf16'])}"]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {mode}: {n}" for n in r.get("notes", [])]
        notes += [f"- {mode}: warning: {n}" for n in r.get("warnings", [])]
    head_notes = [f"- clocks: speedups from {summary['clocks']['speedups']}; threads {summary['threads']}; "
                  f"load average (1/5/15 min, {summary['load_avg']['cpus']} CPUs) {summary['load_avg']['start']} "
                  f"at the start, {summary['load_avg']['end']} at the end"]
    point = comparison_line(summary)
    if point:
        head_notes.append(point)
    head_notes += [f"- {line}" for line in goal_lines(summary)]
    kv = kv_lines(summary)
    return "\n".join(lines + [""] + head_notes + ([""] + kv if kv else []) + ([""] + notes if notes else [])) + "\n"


def goal_lines(summary: dict) -> list[str]:
    """graphrt's fastest graph mode against the strongest ``torch.compile`` peer: as measured in
    the table (one mode after the other), and, where it ran, in turn (the same load for both:
    the ratio to quote), each with the min/median/max of its steady chunks."""
    g = summary.get("goal")
    if not g:
        return []

    def spread(xs):
        return "/".join(f"{x:.2f}" for x in xs) if xs else "-"

    def table_spread(mode):
        r = summary["modes"][mode]
        return spread(r.get("chunk_cpu_ms_spread") or r.get("chunk_ms_spread"))

    lines = [f"goal, in the table: {g['best_graph_mode']} {g['best_ms']:.2f} ms ({table_spread(g['best_graph_mode'])}) "
             f"vs {g['strongest_peer']} {g['peer_ms']:.2f} ms ({table_spread(g['strongest_peer'])}): "
             f"{g['ratio']:.2f}x (target {g['target']}x)"]
    h = g.get("head_to_head")
    if h and "skipped" in h:
        lines.append(f"goal, head to head: skipped: {h['skipped']}")
    elif h:
        lines.append(f"goal, head to head ({h['order']}, {h['videos']} videos each, {h['steady_chunks']} steady "
                     f"chunks, min/med/max): {g['best_graph_mode']} {h['best_ms']:.2f} ms "
                     f"({spread(h.get('best_cpu_ms_spread'))}) vs {g['strongest_peer']} {h['peer_ms']:.2f} ms "
                     f"({spread(h.get('peer_cpu_ms_spread'))}): {h['ratio']:.2f}x")
    return lines


def kv_lines(summary: dict) -> list[str]:
    """With a quantized cache: bytes per session, what it costs per chunk, each mode's error."""
    kv = summary.get("kv")
    if kv is None:
        return []
    c, mib = kv["costs"], 2 ** 20
    lines = [f"K/V {kv['kv_dtype']}: {kv['bytes_per_session'] / mib:,.1f} MiB per session vs "
             f"{kv['bytes_per_session_plain'] / mib:,.1f} MiB in {summary['config']['dtype']} ({kv['ratio']:.3f}x, "
             f"scales and cross-attention K/V included); quantized write + dequantizing read add "
             f"{c['extra_ms_per_chunk']:.3f} ms per chunk (per layer, at the longest KV: read "
             f"{c[kv['kv_dtype']]['read_ms'][-1]:.3f} vs {c[summary['config']['dtype']]['read_ms'][-1]:.3f} ms)"]
    for mode, r in summary["modes"].items():
        if r.get("max_err_vs_unquantized") is not None:
            lines.append(f"  {mode}: error vs the unquantized eager video: max rel {r['max_err_vs_unquantized']:.3e}, "
                         f"rms rel {r['rms_err_vs_unquantized']:.3e}")
    return lines


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, r in summary["modes"].items() if "skipped" not in r and r.get("speedup_vs_reference")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(modes, [summary["modes"][m]["speedup_vs_reference"] for m in modes])
    ax.set_ylabel("speedup vs reference (steady chunk)")
    ax.set_title(f"{summary['preset']} on {summary['device']}")
    ax.axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _check_outputs(opts) -> None:
    """The files asked for can be written, and --plot can draw, before anything runs."""
    for flag, path in (("--json", opts.json_path), ("--md", opts.md), ("--plot", opts.plot)):
        if path is not None:
            check_output_path(flag, path)
    if opts.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib, which is not installed", fix="pip install matplotlib")


def main(argv=None) -> int:
    with stops_cleanly():            # SIGTERM, as Ctrl-C, removes the run's temporary folders on the way out
        return _main(argv)


def _main(argv) -> int:
    if is_llm_argv(argv):
        return llm_main(argv)
    opts = _args(argv)
    quiet = opts.sp > 1 and os.environ.get("RANK", "0") != "0"    # every rank runs, rank 0 reports
    if quiet:
        opts.json_path = opts.md = opts.plot = None
        opts.no_progress = True
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 220, quiet=quiet)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    cfg = BenchConfig(preset=opts.preset, device=opts.device, batch=opts.batch, chunks=opts.chunks, steps=opts.steps,
                      layers=opts.layers,
                      dtype=opts.dtype, attention=opts.attention, checkpoint=opts.checkpoint, repeats=opts.repeats,
                      seed=opts.seed, threads=opts.threads, kv_dtype=opts.kv_dtype, cache_dir=opts.cache_dir,
                      linear_dtype=opts.linear_dtype,
                      kv_buckets=opts.kv_buckets, head_to_head=not opts.no_head_to_head,
                      modes=None if opts.modes is None else tuple(m.strip() for m in opts.modes.split(",")
                                                                  if m.strip()),
                      progress=False, sp=opts.sp)
    try:
        cfg = cfg.with_modes()
        _check_outputs(opts)
    except GraphrtError as e:
        errors.print(f"error: {one_line(e)}", style="red", markup=False)
        return 2

    def save(summary: dict):
        save_outputs(summary, opts.json_path, opts.md, markdown)

    with Progress(console=console, transient=True, disable=opts.no_progress) as bar:
        task = bar.add_task("bench", total=len(cfg.rows))
        bar.update(task, description=f"mode {cfg.modes[0]}")

        def on_mode(mode: str, r: ModeResult, partial: dict):
            state = f"skipped ({r.skipped})" if r.skipped else f"{r.chunk_ms_median:.2f} ms/chunk"
            bar.console.print(f"  {mode}: {state}", markup=False)
            for w in r.warnings:
                bar.console.print(f"  {mode}: warning: {w}", style="yellow", markup=False)
            save(partial)                    # a run cut short keeps the modes it finished
            bar.advance(task)
            i = cfg.rows.index(mode) + 1
            if i < len(cfg.rows):
                bar.update(task, description=f"mode {cfg.rows[i]}")

        try:
            summary = run(cfg, on_mode)
        except GraphrtError as e:       # the model or checkpoint could not be set up: no mode ran
            errors.print(f"error: {one_line(e)}", style="red", markup=False)
            return 2
    console.print(table(summary))
    point = comparison_line(summary)
    if point:
        console.print(point[2:], markup=False)
    for line in goal_lines(summary) + kv_lines(summary):
        console.print(line)
    save(summary)
    if opts.plot:
        plot(summary, opts.plot)
    failed = {m: r["skipped"] for m, r in summary["modes"].items() if "skipped" in r}
    if failed and not quiet:
        errors.print(f"error: {len(failed)} of {len(cfg.rows)} mode(s) did not run: "
                     + "; ".join(f"{m} ({why})" for m, why in failed.items()), style="red", markup=False)
    if not quiet:
        sys.stdout.write(json.dumps(summary) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
