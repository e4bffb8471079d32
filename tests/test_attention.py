"""Attention backends: what ``auto`` picks, pinned SDPA kernels, and the kernel bench."""
import pytest
import torch

from graphrt.attention import BACKENDS, attend, resolve
from graphrt.errors import BackendUnavailableError


def test_auto_on_the_cpu_is_sdpa_and_cuda_kernels_are_refused():
    assert resolve("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    for name in ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient"):
        with pytest.raises(BackendUnavailableError, match="CUDA kernel"):
            resolve(name, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"):
        resolve("cudnn", torch.device("cpu"), torch.float32)
    assert set(BACKENDS) >= {"sdpa", "sdpa-math", "sdpa-cudnn", "flex", "flash"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_pinned_and_ordered_sdpa_equal_plain_sdpa_on_the_cpu(dtype, masked):
    q, k, v = (torch.randn(2, n, 4, 16, dtype=dtype) for n in (12, 40, 40))
    seqlens = torch.tensor([40, 23]) if masked else None
    want = attend(q, k, v, seqlens, "sdpa")
    assert torch.equal(attend(q, k, v, seqlens, "sdpa-auto"), want)   # on the CPU: SDPA's own kernel
    math = attend(q, k, v, seqlens, "sdpa-math")                      # another kernel: a tolerance
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((math.float() - want.float()).abs().max() / want.float().abs().max()).item() < tol
    assert not torch.equal(math, torch.zeros_like(math))


def test_kernel_bench_runs_and_checks_errors_on_the_cpu():
    from graphrt.bench.attention import measure
    from graphrt.models.wan import WanConfig

    res = measure(WanConfig.preset("tiny"), torch.device("cpu"), torch.float32, iters=2,
                  kernels=["sdpa-math", "sdpa-efficient"])
    assert res["kv_tokens"] == [48, 192, 336]          # 1, 4 and 7 chunks of 16 tokens x 3 frames
    math_rows = res["kernels"]["sdpa-math"]
    assert all(r["ms"] > 0 and r["max_rel_err"] < 1e-5 for r in math_rows)
    # the CPU has no memory-efficient kernel: the row says why instead of a time
    assert all("error" in r for r in res["kernels"]["sdpa-efficient"])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-auto", "flex"])
def test_cuda_kernels_match_math_in_bf16(backend):
    q, k, v = (torch.randn(1, n, 12, 128, device="cuda", dtype=torch.bfloat16) for n in (1560, 4680, 4680))
    want = attend(q.float(), k.float(), v.float(), None, "sdpa-math")
    got = attend(q, k, v, None, backend).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    if backend in ("sdpa-auto", "flex"):          # masked buckets too
        sl = torch.tensor([3000], device="cuda", dtype=torch.int32)
        want = attend(q.float(), k.float(), v.float(), sl, "sdpa-math")
        got = attend(q, k, v, sl, backend).float()
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
