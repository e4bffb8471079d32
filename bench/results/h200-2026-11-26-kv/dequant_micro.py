import statistics, torch
torch.manual_seed(0)
dev = "cuda"
N, H, D, L = 33 * 1560, 12, 128, 21 * 1560          # pool tokens, heads, head_dim, kv tokens read
codes = torch.randint(-127, 128, (N, H, D), dtype=torch.int8, device=dev)
scales = torch.rand(N, H, device=dev).to(torch.bfloat16)
plain = torch.randn(N, H, D, device=dev, dtype=torch.bfloat16)
idx = torch.arange(L, device=dev)
def t(fn, iters=30):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
def g64(p):  # gather as 8-byte words
    return p.view(p.shape[0], -1).view(torch.int64).index_select(0, idx).view(torch.int8).view(-1, *p.shape[1:])
def A(): return codes.view(torch.uint8).index_select(0, idx).view(torch.int8) * scales.index_select(0, idx)[..., None]
def B(): return g64(codes) * scales.index_select(0, idx)[..., None]
def C(): return g64(codes).to(torch.bfloat16) * scales.index_select(0, idx)[..., None]
def Dd(): return g64(codes).to(torch.bfloat16).mul_(scales.index_select(0, idx)[..., None])
def base(): return plain.index_select(0, idx)
def base64(): return plain.view(N, -1).view(torch.int64).index_select(0, idx)
ref = A()
for name, fn in [("bf16 gather", base), ("bf16 gather int64", base64), ("A uint8+mixed mul", A), ("B int64+mixed mul", B),
                 ("C int64+to+mul", C), ("D int64+to+mul_", Dd)]:
    out = fn()
    ok = out.shape == ref.shape and (name.startswith("bf16") or torch.equal(out, ref))
    print(f"{name:22s} {t(fn):.4f} ms  equal={ok}", flush=True)
try:
    f = torch.compile(lambda c, s, i: c.index_select(0, i).to(torch.bfloat16) * s.index_select(0, i)[..., None], dynamic=False)
    out = f(codes, scales, idx)
    print(f"{'inductor fused':22s} {t(lambda: f(codes, scales, idx)):.4f} ms  equal={torch.equal(out, ref)}", flush=True)
except Exception as e:
    print("inductor failed", type(e).__name__, str(e)[:200])
x = torch.randn(3 * 1560, H, D, device=dev, dtype=torch.bfloat16)
import sys; sys.path.insert(0, ".")
from graphrt.kv import quantize
print(f"{'quantize int8':22s} {t(lambda: quantize(x, torch.int8, torch.bfloat16)):.4f} ms")
fq = torch.compile(lambda x: quantize(x, torch.int8, torch.bfloat16), dynamic=False)
fq(x)
print(f"{'quantize inductor':22s} {t(lambda: fq(x)):.4f} ms")
