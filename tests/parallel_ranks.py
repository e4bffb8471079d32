"""One rank of the sequence-parallel tests: ``python tests/parallel_ranks.py SCENARIO OUTDIR [DEVICE]``.

Launched N times by ``tests/test_parallel.py`` with the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Each rank writes what it saw to
``OUTDIR/rank<r>.json`` (and its videos to ``OUTDIR/rank<r>.pt``); the test asserts on them.

- ``startup``: the start-up checks (a model that differs on one rank, heads or tokens that do not
  divide; an Engine or a session's inputs that differ on one rank), then two videos one after the
  other, each of two batched sessions and three chunks, in eager, forward-graph and chunk-graph
  modes in float32, eager and chunk-graph in bfloat16, and chunk-graph on a quantized rank-local
  cache (int8 in float32, float8 in bfloat16); rank 0 also runs the single-process generation
  (plain and quantized).
- ``generate``: the generation only (any number of ranks, also 1: one GPU's NCCL in CUDA graphs).
- ``fail``: rank 1 fails inside the handshake, then rank 1 dies before reaching it.
- ``interactive``: two batched sessions on a rolling cache; one switches its prompt (with the KV
  re-cache) after its ring has wrapped, in eager and chunk-graph modes (float32) and eager on an
  int8 cache (bfloat16); rank 0 also runs the same on one process.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

torch.set_num_threads(1)

from graphrt.capture.hostreads import HostReadRecorder  # noqa: E402
from graphrt.errors import GraphrtError  # noqa: E402
from graphrt.models.wan import CausalWan, WanConfig  # noqa: E402
from graphrt.parallel import init_distributed, kv_bytes_per_rank, sequence_parallel  # noqa: E402
from graphrt.pipeline import Engine, FlowMatchSchedule  # noqa: E402

CHUNKS = 3
SEED = 7
SCHEDULE = FlowMatchSchedule(steps=(1000.0, 500.0))   # 2 denoising forwards + the cache pass per chunk
# bfloat16 skips the forward graphs: the whole-chunk graph holds the same forwards (test time);
# "mode+kv_dtype" runs the mode on a quantized cache
MODES = {torch.float32: ("eager", "forward", "chunk", "chunk+int8"),
         torch.bfloat16: ("eager", "chunk", "chunk+float8_e4m3fn")}


def config(**kw) -> WanConfig:
    return WanConfig.preset("tiny", max_frames=3 * CHUNKS, **kw)


def build(cfg, device, dtype, seed=0, attention="sdpa") -> CausalWan:
    torch.manual_seed(seed)
    return CausalWan(cfg, attention=attention).to(device, dtype).eval()


def expect_error(fn) -> str:
    """The first line of the GraphrtError ``fn`` raises (the test asserts on the text)."""
    try:
        fn()
    except GraphrtError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def startup(rank, world, device, out):
    cfg = config()
    # another config on rank 1, other weights on rank 1, heads and tokens that do not divide
    out["mismatch_config"] = expect_error(lambda: sequence_parallel(
        build(cfg.replace(text_len=6) if rank == 1 else cfg, device, torch.float32)))
    out["mismatch_weights"] = expect_error(lambda: sequence_parallel(
        build(cfg, device, torch.float32, seed=rank)))
    out["heads"] = expect_error(lambda: sequence_parallel(
        build(cfg.replace(num_heads=world + 1, dim=12 * (world + 1)), device, torch.float32)))
    out["tokens"] = expect_error(lambda: sequence_parallel(
        build(cfg.replace(height=6, width=6), device, torch.float32)))
    model = sequence_parallel(build(cfg, device, torch.float32))
    out["twice"] = expect_error(lambda: sequence_parallel(model))
    engine_and_session_mismatches(rank, cfg, device, model, out)


def engine_and_session_mismatches(rank, cfg, device, model, out):
    """An Engine or a session that differs on rank 1: every rank raises, naming the field and
    each rank's value, and the ranks stay in step (a matching session then takes a chunk)."""
    kw = dict(max_sessions=2, batch_sizes=(2,), mode="eager", schedule=SCHEDULE, progress=False)
    mine = {"batch_sizes": (1, 2)} if rank == 1 else {}
    out["engine_batch_sizes"] = expect_error(lambda: Engine(model, **{**kw, **mine}))
    out["engine_kv_dtype"] = expect_error(lambda: Engine(model, **kw, kv_dtype="int8" if rank == 1 else None))
    steps = FlowMatchSchedule(steps=(1000.0, 750.0, 500.0)) if rank == 1 else SCHEDULE
    out["engine_schedule"] = expect_error(lambda: Engine(model, **{**kw, "schedule": steps}))
    engine = Engine(model, **kw)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(2)).to(device)
    out["open_seed"] = expect_error(lambda: engine.open(ctx, seed=SEED + rank))
    other = ctx.clone()
    other[0, 0, 0] += rank
    out["open_context"] = expect_error(lambda: engine.open(other, seed=SEED))
    # the same values in another order: a sum of the bytes would not see it
    out["open_context_order"] = expect_error(lambda: engine.open(ctx.flip(1) if rank == 1 else ctx, seed=SEED))
    out["open_shape"] = expect_error(lambda: engine.open(ctx[:, :cfg.text_len - rank], seed=SEED))
    out["open_kept"] = [len(engine.sessions), engine.cache.free_slabs]     # nothing kept by a failed open
    session = engine.open(ctx, seed=SEED)
    out["after_mismatch"] = list(engine.step()[session].shape)
    engine.close(session)


def run_engine(engine, ctx, out, key):
    """Two videos, each of two batched sessions and CHUNKS chunks; returns them as rows 0-1 and
    2-3. The second pair (other seeds, the contexts swapped between slabs) replays the graphs
    the first one captured, on new inputs. The host reads of a steady chunk are counted."""
    videos = []
    for pair, rows in enumerate((ctx, ctx.flip(0))):
        sessions = [engine.open(rows[i:i + 1], seed=SEED + 2 * pair + i) for i in range(rows.shape[0])]
        parts = []
        for c in range(CHUNKS):
            recorder = HostReadRecorder()
            with recorder:
                outs = engine.step()
            if c == 1 and pair == 0:
                out[f"{key}.host_reads"] = recorder.report().count
            parts.append(torch.cat([outs[s] for s in sessions]))
        for s in sessions:
            engine.close(s)
        videos.append(torch.cat(parts, dim=2).cpu())
    return torch.cat(videos)


def generate(rank, world, device, out, videos):
    """Graphs are captured as the buckets are first used (prewarm would capture every KV length
    and the masked variants too: the bench covers it), identically on every rank."""
    gen = torch.Generator().manual_seed(1)
    cfg = config()
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=gen).to(device, dtype)
        model = sequence_parallel(build(cfg, device, dtype))
        sp = model.parallel         # the handshakes run over gloo: the model's group, or a gloo side group
        out["handshake_group"] = [torch.distributed.get_backend(sp.host_group or sp.group), sp.host_group is None]
        res = out.setdefault(name, {})
        for mode in MODES[dtype]:
            engine_mode, _, kv_dtype = mode.partition("+")
            engine = Engine(model, max_sessions=2, batch_sizes=(2,), mode=engine_mode, schedule=SCHEDULE,
                            kv_dtype=kv_dtype or None, progress=False)
            cache = engine.cache
            res[f"{mode}.kv_heads"] = [cache.num_heads, cache.cross_heads, *{t.shape[1] for t in cache.k_scale}]
            res[f"{mode}.kv_dtype"] = str(cache.kv_dtype).removeprefix("torch.")
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.tensors().values()}
            res[f"{mode}.kv_bytes"] = [sum(storages.values()), cache.memory().total]
            res[f"{mode}.kv_bytes_formula"] = kv_bytes_per_rank(cfg, world, dtype=dtype, sessions=2,
                                                                kv_dtype=kv_dtype or None)["total"]
            t0 = time.thread_time()
            videos[f"{name}.{mode}"] = run_engine(engine, ctx, res, mode)
            res[f"{mode}.cpu_s"] = round(time.thread_time() - t0, 2)
            if engine.graphs is not None:
                res[f"{mode}.graphs"] = engine.graphs.stats.captures
        if rank == 0:      # the same generation on one process, same weights: the reference
            for kv_dtype in (None, *(m.partition("+")[2] for m in MODES[dtype] if "+" in m)):
                single = Engine(build(cfg, device, dtype), max_sessions=2, mode="eager", schedule=SCHEDULE,
                                kv_dtype=kv_dtype, progress=False)
                videos[f"{name}.single" + (f"+{kv_dtype}" if kv_dtype else "")] = run_engine(single, ctx, {}, "single")


def fail(rank, world, device, out):
    cfg = config()
    # rank 1 fails inside the handshake (its attention backend cannot run here) ...
    out["inside"] = expect_error(lambda: sequence_parallel(
        build(cfg, device, torch.float32, attention="flash" if rank == 1 else "sdpa")))
    # ... then dies before reaching the next one: rank 0 must exit with an error, not wait
    if rank == 1:
        _write(out)
        os._exit(3)
    sequence_parallel(build(cfg, device, torch.float32))


def interactive(rank, world, device, out, videos):
    gen = torch.Generator().manual_seed(2)
    cfg = config()
    for dtype, modes in ((torch.float32, ("eager", "chunk")), (torch.bfloat16, ("eager+int8",))):
        name = str(dtype).removeprefix("torch.")
        ctx = torch.randn(3, cfg.text_len, cfg.text_dim, generator=gen).to(device, dtype)
        runs = [(m, sequence_parallel(build(cfg, device, dtype))) for m in modes]
        if rank == 0:
            runs += [(m + "+single", build(cfg, device, dtype)) for m in modes if m.startswith("eager")]
        for mode, model in runs:
            engine_mode, _, kv_dtype = mode.removesuffix("+single").partition("+")
            engine = Engine(model, max_sessions=2, batch_sizes=(2,), mode=engine_mode, schedule=SCHEDULE,
                            window=(9, 3), kv_dtype=kv_dtype or None, progress=False)
            a, b = engine.open(ctx[:1], seed=SEED), engine.open(ctx[1:2], seed=SEED + 1)
            parts = []
            for c in range(6):
                if c == 4:
                    engine.set_prompt(a, ctx[2:3])
                outs = engine.step()
                parts.append(torch.cat([outs[a], outs[b]]))
            videos[f"{name}.{mode}"] = torch.cat(parts, dim=2).cpu()


def _write(out):
    with open(os.path.join(out["dir"], f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f, indent=1)


def main(scenario: str, outdir: str, device: str = "cpu") -> int:
    device = init_distributed(device, timeout_s=60)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = {"rank": rank, "world": world, "dir": outdir}
    videos: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            if scenario == "startup":
                t0 = time.thread_time()
                startup(rank, world, device, out)
                out["startup_cpu_s"] = round(time.thread_time() - t0, 2)
                generate(rank, world, device, out, videos)
            elif scenario == "generate":
                generate(rank, world, device, out, videos)
            elif scenario == "interactive":
                interactive(rank, world, device, out, videos)
            elif scenario == "fail":
                fail(rank, world, device, out)
            else:
                raise SystemExit(f"unknown scenario {scenario!r}")
    except Exception:
        out["error"] = traceback.format_exc()
        _write(out)
        raise
    out["process_cpu_s"] = round(time.process_time(), 2)
    torch.save(videos, os.path.join(outdir, f"rank{rank}.pt"))
    _write(out)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
