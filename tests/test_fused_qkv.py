"""Self-attention q/k/v (and cross-attention k/v) as one GEMM, with the plain state dict: the
linears' parameters are views of one fused buffer, kept in step by load, casts and copies."""
import copy

import pytest
import torch

import graphrt
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.quant import Fp8Linear, quantize
from graphrt.tolerance import max_rel_err, tolerance


def _views_of_fused(attn) -> bool:
    w = attn.fused_weight
    return w is not None and all(
        getattr(attn, n).weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        and torch.equal(getattr(attn, n).weight, rows)
        for n, rows in zip(attn.fused_linears, w.chunk(len(attn.fused_linears))))


def test_state_dict_is_the_plain_one_and_loads_keep_the_fusion(cfg):
    ref = ReferenceWan(cfg)
    model = CausalWan(cfg, attention="sdpa")
    sd = model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert not any("fused" in k for k in sd)
    blk = model.blocks[0]
    assert blk.self_attn.fused_linears == ("q", "k", "v") and blk.cross_attn.fused_linears == ("k", "v")
    for how in ("copy", "assign"):
        m = CausalWan(cfg, attention="sdpa")
        m.load_state_dict(ref.state_dict(), assign=how == "assign")
        for b in m.blocks:
            assert _views_of_fused(b.self_attn) and _views_of_fused(b.cross_attn), how
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    # assign=True from another fused model: its fused rows are adopted, not copied (one copy of the weights)
    shared = CausalWan(cfg, attention="sdpa")
    shared.load_state_dict(m.state_dict(), assign=True)
    for a, b in zip(shared.blocks, m.blocks):
        assert a.self_attn.fused_weight.data_ptr() == b.self_attn.fused_weight.data_ptr()
        assert a.cross_attn.fused_bias.data_ptr() == b.cross_attn.fused_bias.data_ptr()
    # an in-place write to a parameter is a write to the fused weight
    with torch.no_grad():
        blk.self_attn.k.weight.mul_(2)
    assert _views_of_fused(blk.self_attn)
    for moved in (model.to(torch.bfloat16), copy.deepcopy(model)):
        assert all(_views_of_fused(b.self_attn) and _views_of_fused(b.cross_attn) for b in moved.blocks)
        assert moved.blocks[0].self_attn.fused_weight.dtype == torch.bfloat16
    with torch.device("meta"):
        empty = CausalWan(cfg, attention="sdpa")
    empty = empty.to_empty(device="cpu")
    empty.load_state_dict(ref.state_dict())
    assert all(_views_of_fused(b.self_attn) for b in empty.blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fused_projections_match_the_separate_gemms(cfg, dtype):
    """One GEMM over the stacked weights against three: within the dtype's tolerance (the GEMM's
    summation order may differ with its width; on this CPU, torch 2.13, it was bit-identical), for
    the projections and for a whole forward."""
    model = CausalWan(cfg, attention="sdpa").eval().to(dtype)
    attn = model.blocks[0].self_attn
    x = torch.randn(2, 48, cfg.dim, dtype=dtype)
    fused = attn.projections(x, ("q", "k", "v"))
    for got, name in zip(fused, "qkv"):
        assert max_rel_err(got, getattr(attn, name)(x)) <= tolerance(dtype), name
    xx = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, dtype=dtype)
    t, ctx = torch.full((1,), 500.0), torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    want = model(xx, t, ctx)
    k, v = model.encode_prompt(ctx)
    separate = copy.deepcopy(model)
    for b in separate.blocks:
        b.self_attn.unfuse()
        b.cross_attn.unfuse()
    assert max_rel_err(want, separate(xx, t, ctx)) <= 4 * tolerance(dtype)
    k2, v2 = separate.encode_prompt(ctx)        # the prompt cache's cross K/V: one GEMM, fused
    assert max_rel_err(k, k2) <= tolerance(dtype) and max_rel_err(v, v2) <= tolerance(dtype)
    g = graphrt.compile(model, verify=2, progress=False)          # replay == eager, bit for bit
    for _ in range(3):
        assert torch.equal(g(xx, t, ctx), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_quantize_makes_the_fused_group_one_fp8_gemm(cfg, dtype):
    model = CausalWan(cfg, attention="sdpa").eval().to(dtype)
    attn = model.blocks[0].self_attn
    separate = {n: Fp8Linear(getattr(attn, n)) for n in "qkv"}
    x = torch.randn(2, 48, cfg.dim, dtype=dtype)
    quantize(model, "fp8")
    assert isinstance(attn.qkv, Fp8Linear) and attn.fused_weight is None and not hasattr(attn, "q")
    assert attn.qkv.weight.shape == (3 * cfg.dim, cfg.dim)
    # one activation quantization (the same per-token scales the three would compute) and one GEMM
    for got, name in zip(attn.projections(x, ("q", "k", "v")), "qkv"):
        assert max_rel_err(got, separate[name](x)) <= tolerance(dtype), name
    (k,) = attn.projections(x, ("k",))                   # a member alone: a slice of the fused output
    assert torch.equal(k, attn.projections(x, ("q", "k", "v"))[1])
    cross = model.blocks[0].cross_attn                   # the prompt's K/V stay unquantized, fused
    assert cross.fused_weight is not None and type(cross.k) is torch.nn.Linear


def test_quantize_of_part_of_a_group_unfuses_it(cfg):
    model = CausalWan(cfg, attention="sdpa").eval()
    report = quantize(model, "fp8", include="blocks.*.self_attn.q")
    attn = model.blocks[0].self_attn
    assert isinstance(attn.q, Fp8Linear) and type(attn.k) is torch.nn.Linear and attn.fused_weight is None
    assert "blocks.0.self_attn.q" in report.converted
    x = torch.randn(1, 8, cfg.dim)
    q, k, v = attn.projections(x, ("q", "k", "v"))
    assert torch.equal(k, attn.k(x)) and torch.equal(q, attn.q(x))
