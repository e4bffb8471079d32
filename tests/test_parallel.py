"""Sequence parallelism (Ulysses) over torch.distributed: 2 ranks with gloo on the CPU.

Each test launches its ranks as separate processes with the variables torchrun sets, on a free
port, under a hard timeout (a hang fails the test, it never stalls CI); the ranks run
``tests/parallel_ranks.py`` and report in JSON.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import graphrt
from graphrt.errors import ConfigError, InputError
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.parallel import Ulysses, _digest, _fingerprint, init_distributed, kv_bytes_per_rank, sequence_parallel
from graphrt.pipeline import Engine
from graphrt.tolerance import max_rel_err, tolerance

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"float32": ("eager", "forward", "chunk"), "bfloat16": ("eager", "chunk")}   # as parallel_ranks.py runs
QUANTIZED = {"float32": "chunk+int8", "bfloat16": "chunk+float8_e4m3fn"}             # rank-local quantized caches
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def rank_env(rank: int, world: int, port: int) -> dict:
    """The variables torchrun sets for one rank."""
    return dict(base_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def launch(tmp_path, scenario: str, world: int = 2, device: str = "cpu", timeout: float = 240.0):
    """Run ``world`` ranks of a scenario; returns (return codes, stderr texts, per-rank JSON).

    Each rank writes its output to files (a full pipe would block a rank while another is read)."""
    port = free_port()
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "parallel_ranks.py"), scenario, str(tmp_path),
                               device], env=rank_env(r, world, port), stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks of {scenario!r} did not finish within {timeout:.0f} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        errs = []
        for f in logs:
            f.seek(0)
            errs.append(f.read())
            f.close()
    reports = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else {})
    return [p.returncode for p in procs], errs, reports


@pytest.fixture(scope="module")
def startup_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    # one launch for every check below (one process start-up and trace); about 45 s of CPU per
    # rank, minutes of wall time on a loaded 2-core machine, so the bound is wide
    codes, errs, reports = launch(tmp, "startup", timeout=480.0)
    if codes != [0, 0]:
        pytest.fail(f"ranks exited with {codes}:\n" + "\n".join(e[-3000:] for e in errs))
    videos = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    return reports, videos


def test_mismatched_ranks_fail_at_startup_on_every_rank(startup_run):
    reports, _ = startup_run
    for rep in reports:       # both ranks raise the same error, naming the rank and the field
        assert rep["mismatch_config"].startswith("ConfigError: rank 1 holds another model than rank 0")
        assert "config.text_len differ" in rep["mismatch_config"] and "config.text_len=6" in rep["mismatch_config"]
        assert "rank 1 holds another model" in rep["mismatch_weights"] and "weights differ" in rep["mismatch_weights"]
        assert "num_heads=3 does not divide among 2 ranks" in rep["heads"] and "[1, 3]" in rep["heads"]
        assert "27 tokens" in rep["tokens"] and "do not divide among 2 ranks" in rep["tokens"]
        assert "already sequence-parallel" in rep["twice"]


def test_an_engine_or_session_that_differs_on_a_rank_fails_on_every_rank(startup_run):
    """Engine arguments and session inputs are checked across ranks: each rank raises the same
    error naming the field and every rank's value (before, a batch size crashed mid-run on a
    collective mismatch, and a seed or kv_dtype gave different, wrong videos with no error).
    The ranks stay in step after it: a matching session then takes a chunk."""
    reports, _ = startup_run
    assert reports[0]["engine_batch_sizes"] == reports[1]["engine_batch_sizes"]
    for rep in reports:
        err = rep["engine_batch_sizes"]
        assert err.startswith("ConfigError: building the Engine: the ranks differ in batch_sizes\n"), err
        assert "rank 0: batch_sizes=(2,); rank 1: batch_sizes=(1, 2)" in err and "fix:" in err
        err = rep["engine_kv_dtype"]
        assert err.startswith("ConfigError: building the Engine: the ranks differ in kv_dtype\n"), err
        assert "rank 0: kv_dtype=float32; rank 1: kv_dtype=int8" in err
        err = rep["engine_schedule"]
        assert err.startswith("ConfigError: building the Engine: the ranks differ in schedule\n"), err
        assert "750.0" in err.partition("rank 1:")[2] and "750.0" not in err.partition("rank 1:")[0]
        err = rep["open_seed"]
        assert err.startswith("InputError: open(): the ranks differ in seed\n"), err
        assert "rank 0: seed=7; rank 1: seed=8" in err
        for key in ("open_context", "open_context_order"):
            assert rep[key].startswith("InputError: open(): the ranks differ in context.digest\n"), rep[key]
        assert rep["open_shape"].startswith("InputError: open(): the ranks differ in context.digest, "
                                            "context.shape\n"), rep["open_shape"]
        assert "context.shape=(1, 8, 32)" in rep["open_shape"] and "context.shape=(1, 7, 32)" in rep["open_shape"]
        assert rep["open_kept"] == [0, 2]
        assert rep["after_mismatch"] == [1, 4, 3, 8, 8]
        assert rep["handshake_group"] == ["gloo", True]       # gloo already: no side group


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sequence_parallel_generation_equals_one_process(startup_run, dtype):
    """Two batched sessions, three chunks, then two more with other seeds and contexts (the
    graphs captured for the first pair replay on new inputs): eager, forward graphs (fp32) and
    the chunk graph on 2 ranks equal the single-process generation within the dtype's tolerance,
    every graph mode agrees bit for bit with the 2-rank eager run, and both ranks hold the same
    whole output."""
    reports, videos = startup_run
    single = videos[0][f"{dtype}.single"]
    assert single.shape == (4, 4, 9, 8, 8)
    assert not torch.equal(single[:2], single[2:])
    tol = tolerance(getattr(torch, dtype))
    for mode in MODES[dtype]:
        got = videos[0][f"{dtype}.{mode}"]
        for pair in (slice(0, 2), slice(2, 4)):
            err = max_rel_err(got[pair].float(), single[pair].float())
            assert err <= tol, f"{mode}, rows {pair}: {err:.3g} > {tol}"
        assert torch.equal(got, videos[0][f"{dtype}.eager"]), mode     # graph replay == eager, per rank
        assert torch.equal(got, videos[1][f"{dtype}.{mode}"]), mode     # both ranks agree


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sequence_parallel_generation_with_quantized_rank_caches(startup_run, dtype):
    """Each rank quantizes the K/V of its own heads, one scale per token and head: the 2-rank
    chunk graphs on int8 (fp32) and float8 (bf16) caches equal the single-process generation on
    the same kv_dtype within the dtype's tolerance, and differ from the unquantized one."""
    reports, videos = startup_run
    mode = QUANTIZED[dtype]
    kv_dtype = mode.partition("+")[2]
    got, single = videos[0][f"{dtype}.{mode}"], videos[0][f"{dtype}.single+{kv_dtype}"]
    for pair in (slice(0, 2), slice(2, 4)):     # the first video, then new inputs to the same graphs
        assert max_rel_err(got[pair].float(), single[pair].float()) <= tolerance(getattr(torch, dtype)), pair
    assert torch.equal(got, videos[1][f"{dtype}.{mode}"])
    plain = videos[0][f"{dtype}.single"]
    assert not torch.equal(single, plain) and max_rel_err(single.float(), plain.float()) <= 1.5e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rank_caches_hold_their_heads_and_no_host_reads(startup_run, dtype):
    reports, _ = startup_run
    cfg = WanConfig.preset("tiny")
    for rep in reports:
        res = rep[dtype]
        for mode in MODES[dtype]:
            assert res[f"{mode}.kv_heads"] == [cfg.num_heads // 2, cfg.num_heads]
            assert res[f"{mode}.kv_dtype"] == dtype
        # quantized: codes and scales of H/2 heads, cross-attention K/V of all H in the model dtype
        mode = QUANTIZED[dtype]
        assert res[f"{mode}.kv_heads"] == [cfg.num_heads // 2, cfg.num_heads, cfg.num_heads // 2]
        assert res[f"{mode}.kv_dtype"] == mode.partition("+")[2]
        assert res[f"{mode}.kv_bytes"][0] < res["chunk.kv_bytes"][0]
        for mode in (*MODES[dtype], mode):
            # allocated storages == memory() == kv_bytes_per_rank from the config alone
            assert res[f"{mode}.kv_bytes"] == [res[f"{mode}.kv_bytes_formula"]] * 2, mode
            assert res[f"{mode}.host_reads"] == 0, mode
            assert res.get(f"{mode}.graphs", 3) == 3, mode        # one per KV length


def test_a_rank_failing_at_startup_stops_the_others(tmp_path):
    codes, errs, reports = launch(tmp_path, "fail", timeout=90)      # a rank left waiting fails here
    # inside the handshake: rank 1's own error there, rank 0 told which rank failed and why
    assert reports[1]["inside"].startswith("BackendUnavailableError")
    assert reports[0]["inside"].startswith("ParallelError: rank 1 failed at start-up")
    assert "flash-attn" in reports[0]["inside"]
    # before the handshake: rank 1 died, rank 0 exits with an error instead of waiting
    assert codes[1] == 3
    assert codes[0] != 0, errs[0][-2000:]
    assert "ParallelError" in reports[0]["error"] and "another rank exited" in reports[0]["error"]


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_torchrun_bench_two_ranks_rank_zero_reports(tmp_path, kv_dtype):
    """``torchrun --nproc-per-node 2 -m graphrt.bench --sp 2`` on the CPU: gloo, one report; with
    ``--kv-dtype int8`` the K/V bytes are those of the rank's quantized cache of H/2 heads."""
    out = tmp_path / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "graphrt.bench", "--sp", "2", "--preset", "tiny", "--modes", "reference,eager,graphs", "--chunks", "2",
           "--steps", "2", "--repeats", "0", "--threads", "1", "--no-progress", "--json", str(out)]
    if kv_dtype:
        cmd += ["--kv-dtype", kv_dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=base_env())
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish within 240 s (a hang)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1                             # rank 0 reports, rank 1 runs silently
    summary = json.loads(lines[0])
    assert summary == json.loads(out.read_text())
    assert summary["device"] == "cpu (1 threads) x 2 ranks (gloo)" and summary["config"]["sp"] == 2
    cfg = WanConfig.preset("tiny", max_frames=6)
    kv = kv_bytes_per_rank(cfg, 2, dtype=torch.float32, kv_dtype=kv_dtype)
    assert summary["config"]["kv_bytes_per_rank"] == kv["total"]
    assert summary["config"]["kv_dtype"] == (kv_dtype or "float32")
    if kv_dtype:
        kv_alone = kv_bytes_per_rank(cfg, 2, dtype=torch.float32, kv_dtype=kv_dtype, keep_latents=False)
        assert summary["kv"]["bytes_per_session"] == kv_alone["per_session"]     # the K/V, without the kept latents
        assert summary["kv"]["bytes_per_session_plain"] == kv_bytes_per_rank(cfg, 2, dtype=torch.float32,
                                                                             keep_latents=False)["per_session"]
    for mode in ("eager", "graphs"):
        r = summary["modes"][mode]
        assert "skipped" not in r, r
        assert r["max_err_vs_reference"] <= (tolerance(torch.float32) if kv_dtype is None else 3e-4)
        if kv_dtype:
            assert 0 < r["max_err_vs_unquantized"] <= 3e-4
        assert r["host_reads_per_chunk"] == 0
    assert summary["modes"]["graphs"]["graphs"] == 2


@pytest.mark.slow
def test_torchrun_bench_two_ranks_runs_every_default_mode(tmp_path):
    """The README's ``torchrun --standalone --nproc-per-node 2 -m graphrt.bench --sp 2 --threads 1``
    (shortened: one layer, one step, two chunks, no repeats) finishes with every default mode run
    and equal to the reference: the inductor modes and the ``torch.compile`` peers compile with
    inductor's Python wrapper there (an AOTInductor package hung in its all-to-all; cpp_wrapper
    refused the collectives). One graph per graphrt mode (``--kv-buckets max``): still minutes, the
    inductor compiles on each rank."""
    from graphrt.bench.presets import default_modes

    out = tmp_path / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "graphrt.bench", "--sp", "2", "--threads", "1", "--preset", "tiny", "--layers", "1", "--chunks", "2",
           "--steps", "1", "--repeats", "0", "--kv-buckets", "max", "--no-head-to-head", "--no-progress",
           "--json", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=base_env())
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish within 1200 s (a hang)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert tuple(summary["modes"]) == default_modes(torch.device("cpu"))
    for mode, r in summary["modes"].items():
        assert "skipped" not in r, (mode, r)
        assert r["max_err_vs_reference"] <= tolerance(torch.float32), mode


def test_bench_sp_needs_as_many_ranks(monkeypatch, capsys):
    """``--sp 2`` on a launch of one rank exits 2 and says how to launch; ``--sp 0`` too."""
    from graphrt.bench.__main__ import main

    assert main(["--sp", "0", "--preset", "tiny", "--no-progress"]) == 2
    for k, v in rank_env(0, 1, free_port()).items():
        monkeypatch.setenv(k, v)
    try:
        assert main(["--sp", "2", "--preset", "tiny", "--modes", "eager", "--no-progress"]) == 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    err = capsys.readouterr().err
    assert "--sp 2 but 1 ranks were launched" in err and "torchrun --nproc-per-node 2" in err


# -- one process ---------------------------------------------------------------------------------
class _Group:
    group_name = "unused"


def test_kv_bytes_per_rank_divides_self_attention_by_ranks():
    cfg = WanConfig.preset("wan-14b")       # 40 heads of 128, 40 layers, 21 frames of 1560 tokens
    sizes = {n: kv_bytes_per_rank(cfg, n, dtype=torch.bfloat16) for n in (1, 2, 4)}
    per_token_head = 2 * 40 * 128 * 2
    assert sizes[1]["self_attention"] == (21 + 3) * 1560 * 40 * per_token_head
    assert sizes[2]["self_attention"] * 2 == sizes[4]["self_attention"] * 4 == sizes[1]["self_attention"]
    assert sizes[1]["cross_attention"] == sizes[4]["cross_attention"] == 2 * 512 * 40 * per_token_head
    # int8 codes (1 byte) plus one bf16 scale per token and head: H/N heads of both on each rank
    int8 = {n: kv_bytes_per_rank(cfg, n, dtype=torch.bfloat16, kv_dtype="int8", keep_latents=False) for n in (1, 4)}
    assert int8[1]["self_attention"] == (21 + 3) * 1560 * 40 * 2 * 40 * (128 + 2)
    assert int8[4]["self_attention"] * 4 == int8[1]["self_attention"]
    assert int8[4]["cross_attention"] == sizes[4]["cross_attention"]        # cross K/V stay in bf16
    assert int8[4]["per_session"] == 21 * 1560 * 10 * 2 * 40 * (128 + 2) + 2 * 512 * 40 * 2 * 40 * 128 + 8
    with pytest.raises(ConfigError, match="does not divide among 3 ranks"):
        kv_bytes_per_rank(cfg, 3)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "float8_e4m3fn"])
def test_kv_bytes_per_rank_is_what_the_cache_allocates(cfg, kv_dtype):
    """kv_bytes_per_rank sizes the cache kv.py builds: equal to a rank-local cache's allocation
    (H/2 heads) and to an Engine's single-process cache, for every kv_dtype and flash's pages."""
    def allocated(c) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in c.tensors().values()}.values())

    model = CausalWan(cfg)
    engine = Engine(model, max_sessions=3, mode="eager", kv_dtype=kv_dtype, progress=False)
    assert allocated(engine.cache) == kv_bytes_per_rank(cfg, 1, dtype=torch.float32, sessions=3,
                                                        max_batch=engine.cache.max_batch, kv_dtype=kv_dtype)["total"]
    rank = graphrt.StaticKVCache.for_config(cfg, dtype=torch.float32, num_heads=cfg.num_heads // 2, num_slabs=2,
                                            kv_dtype=kv_dtype)
    got = kv_bytes_per_rank(cfg, 2, dtype=torch.float32, sessions=2, kv_dtype=kv_dtype, keep_latents=False)
    assert allocated(rank) == got["total"] and rank.memory().per_session == got["per_session"]
    assert got["cross_attention"] == rank.cross_k.nbytes * 2 and rank.cross_k.shape[3] == cfg.num_heads
    paged = graphrt.StaticKVCache.for_model(model, align=256)      # flash-attn's pages of 256 tokens
    assert allocated(paged) == kv_bytes_per_rank(cfg, 1, dtype=torch.float32, align=256, keep_latents=False)["total"]


def test_sequence_parallel_needs_an_initialized_process_group(cfg, monkeypatch):
    with pytest.raises(ConfigError, match="torch.distributed is not initialized"):
        sequence_parallel(CausalWan(cfg))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="not launched as one of several ranks") as e:
        init_distributed("cpu")
    assert "MASTER_PORT" in str(e.value) and "torchrun" in str(e.value)


def test_a_cache_built_before_the_split_is_refused(cfg):
    """A cache sized for all heads cannot serve a rank that keeps half of them."""
    model = CausalWan(cfg).eval()
    cache = graphrt.StaticKVCache.for_model(model)
    model.parallel = Ulysses(_Group(), 0, 2)
    assert model.kv_heads == cfg.num_heads // 2
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width)
    with pytest.raises(InputError, match="the cache does not fit this model") as e:
        model(x, torch.zeros(1), cache=cache, kv_frames=3)
    assert "sequence_parallel" in str(e.value)
    assert graphrt.StaticKVCache.for_model(model).k[0].shape[1] == cfg.num_heads // 2


def test_memory_budget_counts_a_rank_local_cache(cfg, monkeypatch):
    """On a rank the Engine sizes its slabs from the rank's cache (H/2 heads, int8 codes and
    scales), so one budget holds more sessions than on one process; suspend/resume see the same."""
    model = CausalWan(cfg).eval()
    model.parallel = Ulysses(_Group(), 0, 2)
    monkeypatch.setattr(Ulysses, "check_engine", lambda *a, **kw: None)    # one process: no other rank to ask
    rank = kv_bytes_per_rank(cfg, 2, dtype=torch.float32, kv_dtype="int8", max_batch=2)
    whole = kv_bytes_per_rank(cfg, 1, dtype=torch.float32, kv_dtype="int8", max_batch=2)
    budget = rank["total"] + 3 * rank["per_session"]       # 4 sessions of a rank, 2 of a whole model
    assert whole["total"] + whole["per_session"] <= budget < whole["total"] + 2 * whole["per_session"]
    engine = Engine(model, batch_sizes=(1, 2), mode="eager", kv_dtype="int8", memory_budget=budget, progress=False,
                    prompt_cache_bytes=0)
    m = engine.memory().kv
    assert engine.cache.num_slabs == 4 and m.total == kv_bytes_per_rank(
        cfg, 2, dtype=torch.float32, sessions=4, kv_dtype="int8", max_batch=2)["total"] <= budget
    assert (engine.cache.num_heads, engine.cache.cross_heads, engine.cache.k_scale[0].shape[1]) == (2, 4, 2)
    assert m.per_session == rank["per_session"]


def test_a_sequence_parallel_cpu_engine_compiles_with_the_python_wrapper(cfg, monkeypatch):
    """Inductor's C++ wrappers cannot call the collectives (an AOTInductor package hangs in its
    all-to-all, cpp_wrapper refuses the op): on the CPU a sequence-parallel engine's
    ``inductor=True`` is the Python wrapper, and an explicit C++ wrapper is refused up front."""
    model = CausalWan(cfg).eval()
    model.parallel = Ulysses(_Group(), 0, 2)
    seen = []
    monkeypatch.setattr(Ulysses, "check_engine", lambda self, engine, **kw: seen.append(kw["inductor"]))
    Engine(model, mode="chunk", inductor=True, progress=False, cache_dir=False)
    assert seen == ["python"]
    for wrapper in ("aoti", "cpp-wrapper"):
        with pytest.raises(ConfigError, match="C\\+\\+ wrappers do not support the functional collectives"):
            Engine(model, mode="forward", inductor=wrapper, progress=False, cache_dir=False)
    model.parallel = None
    Engine(model, mode="chunk", inductor=True, progress=False, cache_dir=False)        # one process: unchanged
    assert seen == ["python"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_digest_sees_a_transposed_square_weight(cfg, dtype):
    """The same bytes in another order (a square weight transposed, two rows swapped) hold the
    same plain byte sum, so a sum would let the handshake pass; the positional digest differs."""
    torch.manual_seed(0)
    a = CausalWan(cfg).to(dtype)
    b = CausalWan(cfg).to(dtype)
    b.load_state_dict(a.state_dict())
    assert _fingerprint(a) == _fingerprint(b)
    w = b.blocks[0].self_attn.q.weight
    assert w.shape[0] == w.shape[1]
    with torch.no_grad():
        w.copy_(w.t().clone())
    before = a.blocks[0].self_attn.q.weight
    plain = [p.detach().reshape(-1).view(torch.uint8).sum(dtype=torch.int64) for p in (before, w)]
    assert torch.equal(*plain) and not torch.equal(before, w)
    fa, fb = _fingerprint(a), _fingerprint(b)
    differ = [i for i, (x, y) in enumerate(zip(fa["weights"], fb["weights"])) if x != y]
    names = [n for n, _ in b.named_parameters()]
    assert [names[i] for i in differ] == ["blocks.0.self_attn.q.weight"]
    rows = torch.arange(12.).view(3, 4)
    assert _digest(rows) != _digest(rows[[1, 0, 2]])


def test_weight_digest_is_the_same_whatever_the_chunk_size(monkeypatch):
    """Large parameters are digested in chunks on their device; each byte keeps the weight of its
    offset in the whole tensor, so the chunk size changes nothing."""
    import graphrt.parallel as par

    data = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = int((data.long() * (torch.arange(1000) % 65521 + 1)).sum())
    for chunk in (1 << 22, 64, 7):
        monkeypatch.setattr(par, "_DIGEST_CHUNK", chunk)
        assert int(_digest(data)) == want
        assert int(_digest(data.view(torch.float32))) == want       # bytes, whatever the dtype


def test_token_count_that_does_not_divide_is_an_input_error(cfg):
    sp = Ulysses(_Group(), 1, 2)
    assert torch.equal(sp.shard(torch.arange(8.).view(1, 8)), torch.arange(4., 8.).view(1, 4))
    with pytest.raises(InputError, match="9 tokens per chunk do not divide among 2"):
        sp.shard(torch.zeros(1, 9, 4))


# -- GPUs ----------------------------------------------------------------------------------------
def check_gpu_run(tmp_path, world: int):
    videos = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rep in reports:         # the handshakes ran over a gloo side group next to NCCL
        assert rep["handshake_group"] == ["gloo", False]
    for dtype in ("float32", "bfloat16"):
        single = videos[0][f"{dtype}.single"]
        for mode in MODES[dtype]:
            got = videos[0][f"{dtype}.{mode}"]
            err = max_rel_err(got.float(), single.float())
            assert err <= tolerance(getattr(torch, dtype)), (dtype, mode, err)
            assert torch.equal(got, videos[0][f"{dtype}.eager"]), (dtype, mode)   # CUDA graph == eager
            for r in range(1, world):
                assert torch.equal(got, videos[r][f"{dtype}.{mode}"])
        mode = QUANTIZED[dtype]         # quantized rank caches vs one process on the same kv_dtype
        got, ref = videos[0][f"{dtype}.{mode}"], videos[0][f"{dtype}.single+{mode.partition('+')[2]}"]
        assert max_rel_err(got.float(), ref.float()) <= tolerance(getattr(torch, dtype)), (dtype, mode)
        for mode in (*MODES[dtype], mode):
            for rep in reports:
                assert rep[dtype][f"{mode}.host_reads"] == 0
                assert rep[dtype][f"{mode}.kv_bytes"] == [rep[dtype][f"{mode}.kv_bytes_formula"]] * 2


@pytest.mark.cuda
def test_one_gpu_nccl_collectives_inside_cuda_graphs(tmp_path):
    """One rank over NCCL: the all-to-alls and the gather are NCCL calls captured in the CUDA
    graphs (forward and whole chunk) and replayed; the result equals one process without them."""
    codes, errs, _ = launch(tmp_path, "generate", world=1, device="cuda", timeout=400)
    assert codes == [0], errs[0][-3000:]
    check_gpu_run(tmp_path, 1)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL sequence parallelism)")
def test_two_gpus_nccl_all_to_all_inside_cuda_graphs(tmp_path):
    """The 2-rank CPU scenario on 2 GPUs: NCCL all-to-alls captured inside CUDA graphs."""
    codes, errs, reports = launch(tmp_path, "startup", device="cuda", timeout=600)
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    assert "rank 1 holds another model" in reports[0]["mismatch_config"]
    assert "the ranks differ in batch_sizes" in reports[0]["engine_batch_sizes"]
    assert "the ranks differ in seed" in reports[1]["open_seed"]
    check_gpu_run(tmp_path, 2)
