"""``python -m graphrt.bench --preset llama-tiny``: static-cache LLM decode, every mode side by side.

A transformers ``LlamaForCausalLM`` with random weights and a ``StaticCache``; the prompt is
prefilled eagerly in every mode, then greedy decode is timed token by token:

- ``eager``: :class:`graphrt.llm.LLMDecoder` without graphs (the same loop, the plain forward);
- ``graphs``: one graph per batch bucket (CUDA graphs; the CPU emulation on the CPU);
- ``graphs+inductor``: ``graphs`` with each bucket compiled by inductor before capture;
- ``compile``: the peer, transformers' recipe: ``torch.compile`` of the decode step over a
  ``StaticCache`` (``mode="reduce-overhead"`` on CUDA, the default mode on the CPU).

Per mode: time to first token (the eager prefill), per-token latency (median, p90; thread CPU time next to
wall time on the CPU), tokens per second, host reads per token (counted by the checker), graphs,
capture (or compile) seconds, peak memory, token agreement with ``eager`` and the speedup over it.
The JSON summary has the video bench's shape (device, torch, preset, config, modes); its last line
printed is that JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from graphrt.bench.timing import Clock, busy_warning, load_average, noisy_warning, percentile, torch_threads, wall
from graphrt.bench.output import check_output_path, one_line, result_json, save as save_outputs, stops_cleanly
from graphrt.capture import HostReadRecorder
from graphrt.errors import ConfigError, GraphrtError, missing_extra
from graphrt.llm import LLMDecoder

MODES = ("eager", "graphs", "graphs+inductor", "compile")


@dataclass(frozen=True)
class LlmPreset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompt: int = 16               # prompt tokens (prefilled eagerly)
    new_tokens: int = 64           # greedy tokens per sequence
    dtype: str = "bfloat16"
    repeats: int = 3               # sequences timed after the first

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=4096, pad_token_id=0)


PRESETS = {
    "llama-tiny": LlmPreset(64, 2, 4, 2, 128, 256, dtype="float32", repeats=5),
    "llama-small": LlmPreset(512, 8, 8, 4, 1536, 32000, prompt=64, dtype="float32"),    # ~60M parameters
    "llama-1b": LlmPreset(2048, 16, 32, 8, 8192, 128256, prompt=128, new_tokens=128),  # Llama-3.2-1B's shape
}


def is_llm_argv(argv) -> bool:
    """Whether a ``python -m graphrt.bench`` command line names an LLM preset."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            return argv[i + 1] in PRESETS
        if a.startswith("--preset="):
            return a.split("=", 1)[1] in PRESETS
    return False


@dataclass
class LlmBenchConfig:
    preset: str = "llama-tiny"
    device: str | None = None
    batch: int = 1
    prompt: int | None = None
    new_tokens: int | None = None
    dtype: str | None = None
    repeats: int | None = None
    modes: tuple[str, ...] = MODES
    seed: int = 0
    threads: int | None = None     # torch threads; None: 1 on the CPU (stable timings), torch's own on CUDA

    def resolve(self) -> tuple[LlmPreset, torch.device, torch.dtype]:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown LLM bench preset {self.preset!r}", expected=sorted(PRESETS), got=self.preset)
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ConfigError(f"unknown or no mode(s) {sorted(unknown)}", expected=MODES, got=self.modes)
        for name in ("batch", "prompt", "new_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1", got=v)
        if self.repeats is not None and self.repeats < 0:
            raise ConfigError("--repeats must be at least 0", got=self.repeats)
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1", got=self.threads)
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda, but no CUDA device is available", fix="use --device cpu")
        p = PRESETS[self.preset]
        return p, device, getattr(torch, self.dtype or p.dtype)


@dataclass
class LlmModeResult:
    first_token_ms: float | None = None      # prefill and the first token (median over the timed sequences)
    token_ms_median: float | None = None     # one decode step (all rows), wall
    token_ms_p90: float | None = None
    token_cpu_ms_median: float | None = None  # the same step in this thread's CPU time (CPU only)
    tokens_per_s: float | None = None        # rows x steps per second, steady
    host_reads_per_token: float | None = None
    graphs: int | None = None
    capture_s: float | None = None           # capture (graph modes) or compile (the peer), before timing
    peak_mem_bytes: int | None = None
    token_agreement_vs_eager: float | None = None   # fraction of generated tokens equal to eager's
    first_mismatch_vs_eager: int | None = None      # first step where any row differs, None if none
    speedup_vs_eager: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # numbers not to trust as they stand
    skipped: str | None = None

    def to_json(self) -> dict:
        return result_json(self)


class _Peer:
    """transformers' compiled decode: ``torch.compile`` of one step over a ``StaticCache``."""

    def __init__(self, model, max_cache_len: int, cuda: bool):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.graphs = None
        self.compiled = torch.compile(self._step, mode="reduce-overhead" if cuda else None, dynamic=False)

    def _step(self, tok):
        return self.model(input_ids=tok, past_key_values=self.cache, use_cache=True).logits[:, -1].argmax(-1)

    @torch.no_grad()
    def start(self, input_ids, max_new_tokens):
        self.cache.reset()
        logits = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1)

    @torch.no_grad()
    def step(self, tok):
        return self.compiled(tok[:, None]).clone()    # cudagraph trees overwrite their outputs next call


def _driver(mode: str, model, max_cache_len: int, batch: int, device: torch.device):
    if mode == "compile":
        return _Peer(model, max_cache_len, device.type == "cuda")
    return LLMDecoder(model, max_cache_len=max_cache_len, batch_sizes=(batch,),
                   mode="eager" if mode == "eager" else "graphs", inductor=mode == "graphs+inductor",
                   progress=False)


def _sequence(driver, ids, new_tokens: int, clock: Clock):
    """One greedy sequence: tokens [B, new_tokens], prefill ms, per-step wall ms and CPU ms (CPU only)."""
    out = torch.empty(ids.shape[0], new_tokens, dtype=torch.long, device=ids.device)
    clock.sync()
    t0 = clock.mark()
    tok = driver.start(ids, new_tokens)
    out[:, 0] = tok
    marks = [clock.mark()]
    for i in range(1, new_tokens):
        tok = driver.step(tok)
        out[:, i] = tok
        marks.append(clock.mark())
    clock.sync()
    steps = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    cpu_steps = [] if clock.cuda else [clock.cpu_ms(a, b) for a, b in zip(marks, marks[1:])]
    return out, clock.ms(t0, marks[0]), steps, cpu_steps


def _host_reads_per_token(driver, mode: str, ids, notes: list[str]) -> float | None:
    if mode == "compile":
        notes.append("host reads not counted: the checker's hooks change what torch.compile traces")
        return None
    tok = driver.start(ids, 2)
    recorder = HostReadRecorder()
    try:
        with recorder:
            driver.step(tok)
    except Exception as e:
        if mode != "graphs+inductor":
            raise
        notes.append(f"host reads not counted: the checker cannot run inside the inductor-compiled "
                     f"replay ({type(e).__name__})")
        return None
    return float(recorder.report().count)


def measure(mode: str, model, ids, cfg: LlmBenchConfig, preset: LlmPreset, device: torch.device):
    new_tokens = cfg.new_tokens or preset.new_tokens
    repeats = preset.repeats if cfg.repeats is None else cfg.repeats
    res = LlmModeResult()
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = wall()
    driver = _driver(mode, model, ids.shape[1] + new_tokens, ids.shape[0], device)
    if mode == "compile":
        res.notes.append(("torch.compile(mode='reduce-overhead')" if device.type == "cuda" else
                          "torch.compile (default mode)") + " of the decode step; one untimed sequence compiles it")
        _sequence(driver, ids, new_tokens, clock)
    elif driver.graphs is not None:
        driver.prewarm()
    clock.sync()
    res.capture_s = round(wall() - t0, 3)
    runs = [_sequence(driver, ids, new_tokens, clock) for _ in range(1 + repeats)]
    tokens = runs[0][0]
    res.first_token_ms = statistics.median(run[1] for run in runs)
    steps = [ms for run in runs for ms in run[2]]
    res.token_ms_median = statistics.median(steps)
    res.token_ms_p90 = percentile(steps, 0.9)
    noisy = noisy_warning(res.token_ms_p90, res.token_ms_median, len(steps), "tokens")
    if noisy:
        res.warnings.append(noisy)
    if not clock.cuda:
        res.token_cpu_ms_median = statistics.median(ms for run in runs for ms in run[3])
        busy = busy_warning(res.token_ms_median, res.token_cpu_ms_median, "; compare modes by cpu ms")
        if busy:
            res.warnings.append(busy)
    res.tokens_per_s = ids.shape[0] * 1000.0 / res.token_ms_median
    g = getattr(driver, "graphs", None)
    res.graphs = g.stats.captures if g is not None else (0 if mode == "eager" else None)
    if device.type == "cuda":
        res.peak_mem_bytes = torch.cuda.max_memory_allocated()
    else:
        res.notes.append("peak memory is measured on CUDA only")
    res.host_reads_per_token = _host_reads_per_token(driver, mode, ids, res.notes)
    return res, tokens


def run(cfg: LlmBenchConfig, on_mode: Callable[[str, LlmModeResult, dict], None] | None = None) -> dict:
    """Run the selected modes and return the JSON summary (``on_mode`` after each, for partial saves)."""
    preset, device, dtype = cfg.resolve()
    threads = cfg.threads if cfg.threads is not None else (1 if device.type == "cpu" else None)
    with torch_threads(threads):
        return _run(cfg, preset, device, dtype, on_mode)


def _run(cfg: LlmBenchConfig, preset: LlmPreset, device: torch.device, dtype: torch.dtype, on_mode) -> dict:
    from transformers import LlamaForCausalLM

    prompt = cfg.prompt or preset.prompt
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(preset.config()).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(1, preset.vocab, (cfg.batch, prompt), generator=gen).to(device)
    params = sum(p.numel() for p in model.parameters())
    summary = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "load_avg": {"cpus": os.cpu_count(), "start": load_average(), "end": None},   # 1, 5, 15 minutes
        "preset": cfg.preset,
        "clocks": clocks(device),
        "config": {"model": "LlamaForCausalLM", "params": params, "hidden": preset.hidden, "num_layers": preset.layers,
                   "num_heads": preset.heads, "num_kv_heads": preset.kv_heads, "vocab": preset.vocab,
                   "prompt": prompt, "new_tokens": cfg.new_tokens or preset.new_tokens, "batch": cfg.batch,
                   "dtype": str(dtype).removeprefix("torch."), "cache": "StaticCache",
                   "repeats": preset.repeats if cfg.repeats is None else cfg.repeats, "seed": cfg.seed},
        "modes": {},
    }
    results: dict[str, LlmModeResult] = {}
    tokens: dict[str, torch.Tensor] = {}
    for mode in cfg.modes:
        try:
            results[mode], tokens[mode] = measure(mode, model, ids, cfg, preset, device)
        except Exception as e:
            traceback.print_exc()
            results[mode] = LlmModeResult(skipped=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        gc.collect()
        if mode in ("compile", "graphs+inductor"):
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary["modes"] = _compare(results, tokens)
        summary["load_avg"]["end"] = load_average()
        if on_mode is not None:
            on_mode(mode, results[mode], summary)
    return summary


def clocks(device: torch.device) -> dict[str, str]:
    """The clock behind each time field of a mode's result (``summary["clocks"]``)."""
    wall = "CUDA events (device time between marks)" if device.type == "cuda" else "wall: time.perf_counter"
    named = dict(first_token_ms=wall, token_ms_median=wall, token_ms_p90=wall, tokens_per_s=wall,
                 capture_s="wall: time.perf_counter")
    if device.type != "cuda":
        named["token_cpu_ms_median"] = ("thread CPU time: time.thread_time (this thread only; "
                                        "at one torch thread, the work)")
    named["speedups"] = named.get("token_cpu_ms_median", wall)
    return named


def _token_time(r: LlmModeResult) -> float:
    """The decode step time speedups compare: thread CPU time on the CPU, wall on CUDA."""
    return r.token_cpu_ms_median if r.token_cpu_ms_median is not None else r.token_ms_median


def _compare(results: dict[str, LlmModeResult], tokens: dict[str, torch.Tensor]) -> dict:
    base = tokens.get("eager")
    for mode, r in results.items():
        if r.skipped:
            continue
        if base is not None:
            same = tokens[mode] == base
            r.token_agreement_vs_eager = same.float().mean().item()  # host-read-ok: a bench measure
            bad = (~same).any(0).nonzero()
            r.first_mismatch_vs_eager = int(bad[0]) if len(bad) else None
            if not results["eager"].skipped:
                r.speedup_vs_eager = _token_time(results["eager"]) / _token_time(r)
    return {m: r.to_json() for m, r in results.items()}


# -- the command line ---------------------------------------------------------------------------
def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:,.{digits}f}"
    return f"{v:,}"


_COLUMNS = [("mode", None), ("1st token ms", "first_token_ms"), ("token ms", "token_ms_median"),
            ("p90", "token_ms_p90"), ("cpu ms", "token_cpu_ms_median"), ("tokens/s", "tokens_per_s"),
            ("host reads/token", "host_reads_per_token"), ("graphs", "graphs"), ("capture s", "capture_s"),
            ("peak MiB", "peak_mem_bytes"), ("agree vs eager", "token_agreement_vs_eager"),
            ("x eager", "speedup_vs_eager")]


def _cells(mode: str, r: dict) -> list[str]:
    out = [mode]
    for _, k in _COLUMNS[1:]:
        v = r.get(k)
        if k == "peak_mem_bytes" and v is not None:
            v = v / 2 ** 20
        out.append(_fmt(v) + ("x" if k == "speedup_vs_eager" and v is not None else ""))
    return out


def title(summary: dict) -> str:
    c = summary["config"]
    return (f"graphrt.bench: {summary['preset']} on {summary['device']}, torch {summary['torch']} "
            f"({c['params'] / 1e6:.1f}M params, prompt {c['prompt']} + {c['new_tokens']} greedy tokens, "
            f"batch {c['batch']}, {c['dtype']}, {c['cache']})")


def markdown(summary: dict) -> str:
    lines = [title(summary), "", "| " + " | ".join(h for h, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    notes = []
    for mode, r in summary["modes"].items():
        if "skipped" in r:
            lines.append(f"| {mode} | skipped: {r['skipped']} |" + " |" * (len(_COLUMNS) - 2))
            continue
        lines.append("| " + " | ".join(_cells(mode, r)) + " |")
        notes += [f"- {mode}: {n}" for n in r.get("notes", [])]
        notes += [f"- {mode}: warning: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m graphrt.bench --preset llama-...", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny", choices=sorted(PRESETS))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prompt", type=int, help="prompt tokens (default: the preset's)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per sequence (default: the preset's)")
    p.add_argument("--repeats", type=int, help="sequences timed after the first")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the preset's")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on the CPU, for stable timings; "
                   "torch's own on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="also write the JSON summary here")
    p.add_argument("--md", help="also write the table as markdown here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line: 0 when every mode ran, 1 when one did not, 2 on bad arguments."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    opts = _args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    cfg = LlmBenchConfig(preset=opts.preset, device=opts.device, batch=opts.batch, prompt=opts.prompt,
                         new_tokens=opts.new_tokens, dtype=opts.dtype, repeats=opts.repeats, seed=opts.seed,
                         threads=opts.threads, modes=tuple(m.strip() for m in opts.modes.split(",") if m.strip()))
    try:
        cfg.resolve()
        for flag, path in (("--json", opts.json_path), ("--md", opts.md)):
            if path is not None:
                check_output_path(flag, path)
        problem = missing_extra("python -m graphrt.bench --preset " + cfg.preset, "llm")
        if problem:
            raise ConfigError(problem)
    except GraphrtError as e:
        errors.print(f"error: {one_line(e)}", style="red", markup=False)
        return 2

    def save(summary: dict):
        save_outputs(summary, opts.json_path, opts.md, markdown)

    with Progress(console=console, transient=True, disable=opts.no_progress) as bar:
        task = bar.add_task(f"mode {cfg.modes[0]}", total=len(cfg.modes))

        def on_mode(mode, r, partial):
            bar.console.print(f"  {mode}: " + (f"skipped ({r.skipped})" if r.skipped else
                                               f"{r.token_ms_median:.3f} ms/token"), markup=False)
            for w in r.warnings:
                bar.console.print(f"  {mode}: warning: {w}", style="yellow", markup=False)
            save(partial)
            bar.advance(task)
            i = cfg.modes.index(mode) + 1
            if i < len(cfg.modes):
                bar.update(task, description=f"mode {cfg.modes[i]}")

        summary = run(cfg, on_mode)
    t = Table(title=title(summary))
    for h, _ in _COLUMNS:
        t.add_column(h, justify="left" if h == "mode" else "right")
    for mode, r in summary["modes"].items():
        t.add_row(*([mode, f"skipped: {r['skipped']}"] + [""] * (len(_COLUMNS) - 2) if "skipped" in r
                    else _cells(mode, r)))
    console.print(t)
    save(summary)
    failed = {m: r["skipped"] for m, r in summary["modes"].items() if "skipped" in r}
    if failed:
        errors.print(f"error: {len(failed)} of {len(cfg.modes)} mode(s) did not run: "
                     + "; ".join(f"{m} ({why})" for m, why in failed.items()), style="red", markup=False)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    with stops_cleanly():
        raise SystemExit(main())
