"""Which attention kernel runs: ``auto`` against PyTorch's own cuDNN gate (the device capability and
cuDNN version faked on the CPU), ``sdpa-auto`` never forcing cuDNN below it, FA3's and sage's
names and errors, :func:`kernel_name`, and the int8-QK kernel against float32 attention."""
import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

from graphrt import attention as A
from graphrt.attention import attend, cudnn_preferred, kernel_name, resolve
from graphrt.errors import BackendUnavailableError
from graphrt.kernels.sage import sage_attention, sage_reference

CUDA = torch.device("cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as resolve() sees it: capability, cuDNN version, CUDA build, flash-attn."""
    def fake(capability=(9, 0), cudnn=91900, flash_attn=True, cuda="12.8"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(A, "_has_flash_attn", lambda: flash_attn)
        monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", raising=False)
    return fake


def test_auto_on_hopper_with_new_cudnn_is_cudnn_first_even_with_flash_attn(fake_gpu):
    fake_gpu(capability=(9, 0), cudnn=91900, flash_attn=True)
    assert cudnn_preferred(CUDA)
    assert resolve("auto", CUDA, torch.bfloat16) == "sdpa-auto"
    assert resolve("auto", CUDA, torch.float16) == "sdpa-auto"
    assert resolve("auto", CUDA, torch.float32) == "sdpa"     # fp32: neither cuDNN nor flash-attn
    fake_gpu(capability=(10, 0), cudnn=91501, flash_attn=True)   # Blackwell, 9.15.1: PyTorch's gate holds too
    assert resolve("auto", CUDA, torch.bfloat16) == "sdpa-auto"


@pytest.mark.parametrize("cudnn", [91000, 91500])
def test_auto_below_the_gate_does_not_force_cudnn(fake_gpu, cudnn):
    fake_gpu(capability=(9, 0), cudnn=cudnn, flash_attn=True)
    assert not cudnn_preferred(CUDA)
    assert resolve("auto", CUDA, torch.bfloat16) == "flash"      # what it picked before: not cuDNN
    fake_gpu(capability=(9, 0), cudnn=cudnn, flash_attn=False)
    assert resolve("auto", CUDA, torch.bfloat16) == "sdpa"       # SDPA's own order, nothing forced
    # sdpa-auto itself leaves SDPA alone below the gate
    assert isinstance(A._sdpa_kernels("sdpa-auto", CUDA), contextlib.nullcontext)


def test_the_gate_follows_pytorch_in_every_other_clause(fake_gpu, monkeypatch):
    fake_gpu(capability=(8, 0), cudnn=91900)                      # Ampere: flash-attn as before
    assert not cudnn_preferred(CUDA) and resolve("auto", CUDA, torch.bfloat16) == "flash"
    fake_gpu(capability=(9, 0), cudnn=None)                       # no cuDNN at all
    assert not cudnn_preferred(CUDA)
    fake_gpu(capability=(10, 1), cudnn=91900, cuda="12.8")        # minor 1 before CUDA 13: no
    assert not cudnn_preferred(CUDA)
    fake_gpu(capability=(10, 1), cudnn=91900, cuda="13.0")        # any minor from CUDA 13
    assert cudnn_preferred(CUDA)
    fake_gpu(capability=(9, 0), cudnn=91900)
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")     # the user's opt-out wins
    assert not cudnn_preferred(CUDA) and resolve("auto", CUDA, torch.bfloat16) == "flash"
    assert not cudnn_preferred(torch.device("cpu"))


def test_sdpa_auto_is_cudnn_first_above_the_gate(fake_gpu):
    from torch.nn.attention import SDPBackend

    fake_gpu(capability=(9, 0), cudnn=91900)
    ctx = A._sdpa_kernels("sdpa-auto", CUDA)
    assert not isinstance(ctx, contextlib.nullcontext)
    with ctx:                       # sdpa_kernel's priority list: cuDNN first (only the context's state)
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)


def test_fa3_and_sage_names_and_errors(fake_gpu, monkeypatch):
    assert {"fa3", "sage"} <= set(A.BACKENDS)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        resolve("fa3", torch.device("cpu"), torch.bfloat16)
    fake_gpu()
    monkeypatch.setattr(A, "_has_module", lambda name: False)
    with pytest.raises(BackendUnavailableError, match="flash_attn_interface") as e:
        resolve("fa3", CUDA, torch.bfloat16)
    assert "fix:" in str(e.value) and "hopper" in str(e.value)
    monkeypatch.setattr(A, "_has_module", lambda name: name == A.FA3_MODULE)
    assert resolve("fa3", CUDA, torch.bfloat16) == "fa3"
    assert kernel_name("fa3", CUDA, torch.bfloat16) == "fa3:sdpa-flash"
    assert kernel_name("fa3", CUDA, torch.bfloat16, masked=True) == "fa3:flash_attn_kvcache"
    assert kernel_name("sage", CUDA, torch.bfloat16) == "sage:graphrt-triton"
    monkeypatch.setattr(A, "_has_module", lambda name: name == "sageattention")
    assert kernel_name("sage", CUDA, torch.bfloat16) == "sage:sageattention"
    assert kernel_name("sage", CUDA, torch.bfloat16, masked=True) == "sage:graphrt-triton"
    assert resolve("sage", torch.device("cpu"), torch.float32) == "sage"


def test_kernel_name_on_the_cpu():
    cpu = torch.device("cpu")
    assert kernel_name("sdpa-math", cpu, torch.float32) == "sdpa:MATH"
    assert kernel_name("auto", cpu, torch.float32) == "sdpa:FLASH_ATTENTION"     # SDPA's CPU flash kernel
    assert kernel_name("sdpa", cpu, torch.float64, (1, 12, 4, 16), 40, masked=True) in ("sdpa:MATH",
                                                                                       "sdpa:FLASH_ATTENTION")
    assert kernel_name("flex", cpu, torch.float32) == "flex:unfused"
    assert kernel_name("sage", cpu, torch.bfloat16) == "sage:aten-reference"
    with pytest.raises(BackendUnavailableError):
        kernel_name("flash", cpu, torch.bfloat16)


def _float32_attention(q, k, v, seqlens=None):
    """[B, H, L, D] float32 SDPA with the same key mask."""
    mask = None if seqlens is None else A.valid_key_mask(seqlens, k.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


# int8 Q·Kᵀ with per-block scales: about 1-2% max error against float32 on random inputs (measured:
# 0.9% fp32, 1.6-1.8% bf16 at head dim 32); bounds 3% and 4%
SAGE_TOL = {torch.float32: 3e-2, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_sage_reference_is_close_to_float32_attention_and_the_op_is_registered(dtype, masked):
    q, k, v = (torch.randn(2, 2, n, 32, dtype=dtype) for n in (40, 72, 72))
    seqlens = torch.tensor([72, 50]) if masked else None
    want = _float32_attention(q, k, v, seqlens)
    got = sage_attention(q, k, v, seqlens, 16, 16)
    assert got.dtype == dtype and torch.equal(got, sage_reference(q, k, v, seqlens, 16, 16))
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert 1e-4 < err < SAGE_TOL[dtype], err               # int8: never exact, within the bound
    # through attend on the model's [B, L, H, D] layout
    via = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seqlens, "sage")
    assert torch.equal(via.transpose(1, 2), sage_attention(q, k, v, seqlens))
    torch.library.opcheck(sage_attention, (q, k, v, seqlens, 16, 16),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


_INTERPRETED = r"""
import torch
from graphrt.kernels.sage import sage_reference, sage_triton
torch.manual_seed(0)
worst = {}
for dtype in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(1, 2, n, 32, dtype=dtype) for n in (40, 72, 72))
    for seqlens in (None, torch.tensor([50])):
        mask = None if seqlens is None else (torch.arange(72) < seqlens[:, None])[:, None, None, :]
        f32 = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        tri = sage_triton(q, k, v, seqlens, 16, 16)
        ref = sage_reference(q, k, v, seqlens, 16, 16)
        assert tri.dtype == dtype and tri.shape == f32.shape
        e32 = ((tri.float() - f32).abs().max() / f32.abs().max()).item()
        eref = ((tri.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(dtype, seqlens is not None, e32, eref)
        assert e32 < {torch.float32: 3e-2, torch.bfloat16: 4e-2}[dtype], e32
        assert eref < {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype], eref
print("ok")
"""


def test_sage_triton_kernel_under_the_interpreter_matches_float32_and_its_reference():
    """The Triton kernel, run by Triton's interpreter on the CPU (a fresh process: the interpreter
    is chosen when Triton first loads). Against float32 attention within SAGE_TOL; against the
    aten reference within 1e-5 in fp32 (same arithmetic, other summation order) and 1.6e-2 in bf16
    (P rounded to bf16 per key block against the reference's one float32 softmax)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "sdpa-auto", "fa3", "sage", "flash"])
@pytest.mark.parametrize("masked", [False, True])
def test_each_attention_name_on_cuda_against_float32_and_cudnn(backend, masked):
    """Each name against float32 math and against cuDNN, at Wan's shapes (12 heads of 128, a
    1560-token chunk against 4680 keys), bf16; names that cannot run here skip with the reason."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    why = None if backend == "auto" else A.unavailable_reason(backend, dev, dtype)
    if why:
        pytest.skip(why)
    q, k, v = (torch.randn(1, n, 12, 128, device=dev, dtype=dtype) for n in (1560, 4680, 4680))
    seqlens = torch.tensor([3000], device=dev, dtype=torch.int32) if masked else None
    name = resolve(backend, dev, dtype)
    f32 = attend(q.float(), k.float(), v.float(), seqlens, "sdpa-math").float()
    got = attend(q, k, v, seqlens, name).float()
    tol = 4e-2 if name == "sage" else 2e-2
    assert ((got - f32).abs().max() / f32.abs().max()).item() < tol
    if not masked:
        cudnn = attend(q, k, v, None, "sdpa-cudnn").float()
        assert ((got - cudnn).abs().max() / cudnn.abs().max()).item() < tol + 2e-2
    assert kernel_name(backend, dev, dtype, tuple(q.shape), k.shape[1], masked)
    if backend == "auto" and torch.cuda.get_device_capability() == (9, 0) and cudnn_preferred(dev) and not masked:
        assert kernel_name(backend, dev, dtype, tuple(q.shape), k.shape[1]) == "sdpa:CUDNN_ATTENTION"


@pytest.mark.cuda
def test_sage_triton_kernel_on_cuda_matches_its_reference():
    q, k, v = (torch.randn(1, 12, n, 128, device="cuda", dtype=torch.bfloat16) for n in (390, 1560, 1560))
    for seqlens in (None, torch.tensor([1000], device="cuda")):
        tri = sage_attention(q, k, v, seqlens)
        ref = sage_reference(q, k, v, seqlens)
        assert ((tri.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 2e-2
        assert not math.isnan(tri.float().sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_sage_runs_the_engine_graphs_equal_to_eager_and_close_to_sdpa(cfg, dtype):
    """CausalWan with attention="sage" (the aten reference on the CPU): captured graphs replay it
    bit for bit, and the video stays near SDPA's (measured rms 2.5e-4 fp32, 3.1e-3 bf16)."""
    from graphrt.models.wan import CausalWan
    from graphrt.pipeline import Engine
    from graphrt.tolerance import rms_rel_err

    sage = CausalWan(cfg, attention="sage").eval().to(dtype)
    sdpa = CausalWan(cfg, attention="sdpa").eval().to(dtype)
    sdpa.load_state_dict(sage.state_dict())
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    eager = Engine(sage, mode="eager", progress=False).generate(ctx, 2, seed=3)
    assert torch.equal(Engine(sage, mode="chunk", progress=False).generate(ctx, 2, seed=3), eager)
    err = rms_rel_err(eager, Engine(sdpa, mode="eager", progress=False).generate(ctx, 2, seed=3))
    assert 0 < err < (2e-3 if dtype == torch.float32 else 1.5e-2), err
