"""graphrt.kernels: each fused op's Triton kernel (under Triton's CPU interpreter) equals its aten
reference; the fused CausalWan equals the aten one within the dtype's tolerance, replays bit for bit
and reads nothing on the host. CUDA-marked twins run the compiled kernels on a GPU."""
import os
import sys

import pytest
import torch

# Triton's interpreter must be on when triton is first imported. On a CUDA machine it stays off: it
# would stand in for every Triton kernel of the session (inductor's too); the cuda tests run ours.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

triton = pytest.importorskip("triton")

import graphrt
from graphrt import kernels as K
from graphrt.errors import ConfigError, InputError
from graphrt.kv import StaticKVCache
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.replay import Buckets
from graphrt.tolerance import max_rel_err, tolerance

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# (batch, tokens, width, heads): odd token counts, widths and head dims that are not powers of two;
# the last spans several programs under the interpreter, the last one partly masked
SHAPES = [(1, 1, 12, 1), (2, 7, 60, 5), (3, 13, 600, 5)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _interpret(request):
    """CPU tests run the kernels under Triton's interpreter; CUDA tests run them compiled."""
    if request.node.get_closest_marker("cuda") is None and not INTERPRET:
        pytest.skip("Triton's interpreter is off (a CUDA machine, or triton imported before this module)")


@pytest.fixture
def cfg():
    """The tiny Wan with one latent frame per chunk: the interpreter runs one program per token."""
    return WanConfig.preset("tiny", chunk_frames=1, max_frames=3)


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    err = max_rel_err(got, want)
    assert err <= tolerance(dtype), f"max rel err {err:.2e} > {tolerance(dtype):.0e}"


def _inputs(b, n, d, heads, dtype, device):
    x = torch.randn(b, n, d, device=device).to(dtype)
    cos, sin = torch.randn(2, b, n, 1, d // heads // 2, device=device).unbind(0)
    mod = torch.randn(b, 6, d, device=device).chunk(6, dim=1)      # float32 views, batch stride 6*d
    return x, cos, sin, mod


# -- each kernel vs its reference ------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@DTYPES
def test_rms_norm_rope_kernel(shape, dtype, device):
    b, n, d, heads = shape
    x, cos, sin, _ = _inputs(b, n, d, heads, dtype, device)
    w = torch.randn(d, device=device)
    assert K.use_triton(x)
    _close(K.rms_norm(x, w, 1e-6), K.rms_norm_reference(x, w, 1e-6), dtype)
    got = K.rms_norm_rope(x, w, cos, sin, heads, 1e-6)
    assert got.shape == (b, n, heads, d // heads)
    _close(got, K.rms_norm_rope_reference(x, w, cos, sin, heads, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@DTYPES
@pytest.mark.parametrize("affine,modulated", [(False, True), (True, False), (True, True), (False, False)])
def test_layer_norm_mod_kernel(shape, dtype, device, affine, modulated):
    b, n, d, heads = shape
    x, _, _, mod = _inputs(b, n, d, heads, dtype, device)
    w, bias = (torch.randn(d, device=device), torch.randn(d, device=device)) if affine else (None, None)
    scale, shift = (mod[1], mod[0]) if modulated else (None, None)
    _close(K.layer_norm_mod(x, w, bias, scale, shift, 1e-6),
           K.layer_norm_mod_reference(x, w, bias, scale, shift, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@DTYPES
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "plain"])
def test_gate_residual_kernels(shape, dtype, device, gated):
    b, n, d, heads = shape
    x, _, _, mod = _inputs(b, n, d, heads, dtype, device)
    y = torch.randn(b, n, d, device=device).to(dtype)
    gate = mod[2] if gated else None
    want = K.gate_residual_reference(x, y, gate)
    _close(K.gate_residual(x, y, gate), want, dtype)
    # with the next modulated norm, and with an affine one (the cross-attention's norm3)
    for w, bias, scale, shift in ((None, None, mod[4], mod[3]), (torch.randn(d, device=device),
                                                                 torch.randn(d, device=device), None, None)):
        xn, h = K.gate_residual_norm(x, y, gate, w, bias, scale, shift, 1e-6)
        _close(xn, want, dtype)
        _close(h, K.layer_norm_mod_reference(want, w, bias, scale, shift, 1e-6), dtype)


@DTYPES
def test_modulation_shared_by_the_batch(dtype):
    """A [1, 1, N] scale/shift/gate serves every batch row (stride 0), as the reference broadcasts it."""
    x, _, _, mod = _inputs(3, 5, 36, 3, dtype, "cpu")
    scale, shift, gate = (m[:1] for m in mod[:3])
    _close(K.layer_norm_mod(x, None, None, scale, shift, 1e-6),
           K.layer_norm_mod_reference(x, None, None, scale, shift, 1e-6), dtype)
    _close(K.gate_residual(x, x, gate), K.gate_residual_reference(x, x, gate), dtype)


@pytest.mark.parametrize("interpret", [True, False], ids=["triton", "reference"])
def test_bad_modulation_says_what(interpret, monkeypatch):
    if not interpret:
        monkeypatch.delenv("TRITON_INTERPRET")
    x, _, _, mod = _inputs(2, 3, 12, 2, torch.float32, "cpu")
    with pytest.raises(InputError, match="both scale and shift"):
        K.layer_norm_mod(x, None, None, mod[1], None, 1e-6)
    if interpret:           # the reference path raises torch's own broadcast error
        with pytest.raises(InputError, match="broadcast"):
            K.gate_residual(x, x, torch.randn(3, 1, 12))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_an_h100_without_one(dtype):
    """Triton's compiler (no GPU needed) takes each kernel, at the 1.3B model's widths, down to an
    sm_90 binary: what the interpreter accepts, the GPU build accepts too."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from graphrt.kernels import _triton as T

    def build(name, pointers, scalars, constexprs):
        sig = {**pointers, **{s: ("fp32" if s == "eps" else "i32") for s in scalars},
               **{c: "constexpr" for c in constexprs}}
        src = ASTSource(fn=T._BUILT[name][0], signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32))

    p = {n: f"*{dtype}" if n in ("x_ptr", "out_ptr") else "*fp32" for n in ("x_ptr", "w_ptr", "cos_ptr", "sin_ptr", "out_ptr")}
    try:
        k = build("rms_rope_kernel", p, ("R", "N", "HALF_D", "eps"), dict(ROPE=True, ROWS=1, BLOCK=1024))
    except Exception as e:  # no NVIDIA backend (ptxas) in this Triton build
        pytest.skip(f"Triton cannot build for sm_90 here: {e}")
    assert k.asm["cubin"]
    names = ("x_ptr", "y_ptr", "gate_ptr", "w_ptr", "b_ptr", "scale_ptr", "shift_ptr", "xout_ptr", "hout_ptr")
    p = {n: f"*{dtype}" if n in ("x_ptr", "y_ptr", "xout_ptr", "hout_ptr") else "*fp32" for n in names}
    flags = dict(HAS_RES=True, HAS_GATE=True, HAS_NORM=True, HAS_W=True, HAS_B=True, HAS_MOD=True, ROWS=1, BLOCK=2048)
    assert build("residual_norm_kernel", p, ("R", "N", "L", "eps", "gate_bs", "scale_bs", "shift_bs"), flags).asm["cubin"]


def test_ops_pass_torch_library_checks():
    """Schema, fake (meta) implementation and tracing agree with the real op: what capture,
    inductor and the traffic count see is one op of the right shape."""
    x, cos, sin, mod = _inputs(2, 3, 12, 2, torch.float32, "cpu")
    w = torch.randn(12)
    cases = [(K.rms_norm, (x, w, 1e-6)), (K.rms_norm_rope, (x, w, cos, sin, 2, 1e-6)),
             (K.layer_norm_mod, (x, None, None, mod[1], mod[0], 1e-6)), (K.gate_residual, (x, x, mod[2])),
             (K.gate_residual_norm, (x, x, mod[2], w, w, mod[1], mod[0], 1e-6))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_reference_path_without_triton(monkeypatch):
    """Without the interpreter the CPU runs each op's reference: the aten math exactly."""
    monkeypatch.delenv("TRITON_INTERPRET")
    x, cos, sin, mod = _inputs(2, 7, 60, 5, torch.bfloat16, "cpu")
    w = torch.randn(60)
    assert not K.use_triton(x)
    assert torch.equal(K.rms_norm_rope(x, w, cos, sin, 5, 1e-6), K.rms_norm_rope_reference(x, w, cos, sin, 5, 1e-6))


# -- the fused model -------------------------------------------------------------------------------
def _pair(cfg, dtype, device="cpu"):
    aten = CausalWan(cfg, attention="sdpa", kernels="aten").to(device, dtype).eval()
    fused = CausalWan(cfg, attention="sdpa", kernels="fused").to(device, dtype).eval()
    fused.load_state_dict(aten.state_dict())
    return aten, fused


def _prompt_cache(model, cfg, device="cpu", seed=7):
    """A one-slab cache holding the cross-attention K/V of a prompt drawn from ``seed``."""
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype)
    k, v = model.encode_prompt(ctx)
    cache = StaticKVCache.for_model(model, num_slabs=1)
    slab = cache.acquire()
    cache.set_cross(slab, k[:, 0], v[:, 0])
    cache.bind([slab])
    return cache


def test_kernels_option(cfg):
    from graphrt.pipeline import Engine

    assert CausalWan(cfg).kernel_path == "aten"                      # auto on the CPU
    assert CausalWan(cfg, kernels="fused").kernel_path == "fused"
    model = CausalWan(cfg)
    engine = Engine(model, mode="eager", progress=False)
    assert engine.kernel_path == "aten"
    model.kernels = "fused"                                          # read at each forward, and by the engine
    assert engine.kernel_path == "fused"
    with pytest.raises(ConfigError, match="kernels"):
        CausalWan(cfg, kernels="triton")


@DTYPES
@torch.no_grad()
def test_fused_model_matches_aten(cfg, dtype):
    """Whole forwards, full attention over a text context and two cached chunks, fused vs aten."""
    aten, fused = _pair(cfg, dtype)
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width).to(dtype)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 5, cfg.text_dim).to(dtype)
    _close(fused(x, t, ctx), aten(x, t, ctx), dtype)
    caches = [_prompt_cache(m, cfg) for m in (aten, fused)]
    for c in range(2):
        x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width).to(dtype)
        kv = (c + 1) * cfg.chunk_frames
        want = aten(x, t, cache=caches[0], kv_frames=kv, kv_exact=True)
        _close(fused(x, t, cache=caches[1], kv_frames=kv, kv_exact=True), want, dtype)
        for cache in caches:
            cache.commit(1, cfg.chunk_frames)


@torch.no_grad()
def test_fused_model_without_norms_matches_aten():
    """qk_norm=False and cross_attn_norm=False take the unfused q/k and the plain residual."""
    cfg = WanConfig.preset("tiny", qk_norm=False, cross_attn_norm=False)
    aten, fused = _pair(cfg, torch.float32)
    x, t, ctx = torch.randn(1, cfg.in_dim, 3, 8, 8), torch.tensor([250.0]), torch.randn(1, 4, cfg.text_dim)
    _close(fused(x, t, ctx), aten(x, t, ctx), torch.float32)


def _replay_equals_eager(cfg, dtype, device, backend):
    _, fused = _pair(cfg, dtype, device)
    gcache, ecache = (_prompt_cache(fused, cfg, device) for _ in range(2))
    kv = tuple(range(cfg.chunk_frames, 2 * cfg.chunk_frames + 1, cfg.chunk_frames))
    spec = Buckets((1,), batch_args=("x", "t"), static_args={"kv_frames": kv, "kv_exact": (True,)})
    g = graphrt.compile(fused, buckets=spec, backend=backend, progress=False)
    for c in range(2):
        for step in (750.0, 0.0):
            x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, device=device).to(dtype)
            t = torch.full((1,), step, device=device)
            kw = dict(kv_frames=(c + 1) * cfg.chunk_frames, kv_exact=True)
            got = g(x, t, cache=gcache, **kw)
            want = fused(x, t, cache=ecache, **kw)
            assert torch.equal(got, want), f"chunk {c}, t={step}: {max_rel_err(got, want):.2e}"
        gcache.commit(1, cfg.chunk_frames)
        ecache.commit(1, cfg.chunk_frames)
    assert g.stats.captures == 2


@DTYPES
@torch.no_grad()
def test_fused_replay_is_bit_identical(cfg, dtype):
    _replay_equals_eager(cfg, dtype, "cpu", "cpu-graph")


@torch.no_grad()
def test_torch_compile_sees_one_node_per_fused_op(cfg):
    """Dynamo traces the fused forward whole (fullgraph) and the AOT graph holds each custom op as
    one node, 1 + 6 per block; running that graph equals the eager forward bit for bit."""
    from torch._dynamo.backends.common import aot_autograd

    _, fused = _pair(cfg, torch.float32)
    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, _: graphs.append(gm) or gm)
    x, t, ctx = torch.randn(1, cfg.in_dim, cfg.chunk_frames, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, cfg.text_dim)
    torch._dynamo.reset()
    got = torch.compile(fused, backend=backend, fullgraph=True)(x, t, ctx)
    assert torch.equal(got, fused(x, t, ctx))
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(o.startswith("graphrt.") for o in ops) == 1 + 6 * cfg.num_layers
    assert "aten.native_layer_norm.default" not in ops     # (the text K's RMS norm stays aten: per prompt)


@DTYPES
@torch.no_grad()
def test_cpu_inductor_traces_see_through_the_fused_ops(cfg, dtype, monkeypatch):
    """What a CPU inductor build compiles: the fused forward traced with every graphrt op replaced
    by its aten reference (so inductor can fuse the chain), which runs bit for bit like the
    reference path; without inductor the trace keeps one node per op."""
    from graphrt.capture.backends import CPU_DECOMPOSITIONS, trace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the ops' CPU kernel: their reference
    _, fused = _pair(cfg, dtype)
    cache = _prompt_cache(fused, cfg)
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width).to(dtype)
    args = (x, torch.tensor([500.0]))

    def fn(x, t):
        return fused(x, t, cache=cache, kv_frames=cfg.chunk_frames, kv_exact=True)

    ops = {op.name() for op in CPU_DECOMPOSITIONS}
    assert {"graphrt::rms_norm_rope", "graphrt::layer_norm_mod", "graphrt::gate_residual_norm"} <= ops
    seen = trace(fn, args, False, decompositions=CPU_DECOMPOSITIONS)
    kept = trace(fn, args, False)
    names = [[str(n.target) for n in gm.graph.nodes if n.op == "call_function"] for gm in (seen, kept)]
    assert not any(o.startswith("graphrt.") for o in names[0])
    assert sum(o.startswith("graphrt.") for o in names[1]) == 1 + 6 * cfg.num_layers
    assert torch.equal(seen(*args), fn(*args))


@torch.no_grad()
def test_fused_forward_reads_nothing_on_the_host(cfg):
    _, fused = _pair(cfg, torch.float32)
    cache = _prompt_cache(fused, cfg)
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width)
    report = graphrt.check(fused, x, torch.tensor([500.0]), cache=cache, kv_frames=cfg.chunk_frames, kv_exact=True)
    assert report.count == 0 and report.ok, str(report)


@pytest.mark.cuda
@DTYPES
@torch.no_grad()
def test_fused_cuda_graph_replay_is_bit_identical(cfg, dtype):
    _replay_equals_eager(cfg, dtype, "cuda", "cuda-graph")


@pytest.mark.cuda
@DTYPES
@torch.no_grad()
def test_fused_model_matches_aten_on_cuda(cfg, dtype):
    aten, fused = _pair(cfg, dtype, "cuda")
    assert CausalWan(cfg).to("cuda").kernel_path == "fused"         # auto on CUDA with Triton
    from graphrt.pipeline import Engine

    assert Engine(CausalWan(cfg).to("cuda"), mode="eager", progress=False).kernel_path == "fused"   # the default
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, device="cuda").to(dtype)
    t, ctx = torch.tensor([500.0], device="cuda"), torch.randn(1, 5, cfg.text_dim, device="cuda").to(dtype)
    _close(fused(x, t, ctx), aten(x, t, ctx), dtype)
