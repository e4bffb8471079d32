"""Modules and math shared by the reference and the graph-safe Wan DiT.

Parameter names follow the original Wan 2.1 checkpoint layout (``blocks.N.self_attn.q``,
``blocks.N.norm3``, ``head.modulation``, ...) so a real checkpoint loads with
``load_state_dict``. Precision follows Wan: modulation, norms and residual adds in float32,
matmuls in the model dtype. Norms compute in float32 with float32 weights whatever the model
dtype (as upstream Wan runs them under autocast), so a bf16 or fp16 model never mixes dtypes
inside a norm.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from graphrt.errors import InputError
from graphrt.kv import same_device
from graphrt.models.wan.config import WanConfig
from graphrt.quant import WAN_FP8_LINEARS

ROPE_MAX_LEN = 1024  # positions per axis in the RoPE tables, as in Wan


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: float64 sinusoid, cos first. ``position`` [N] -> [N, dim]."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    sinusoid = torch.outer(position, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_angles(max_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE angles [max_len, dim // 2] in float64, as Wan's ``rope_params`` before ``polar``."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))
    return torch.outer(torch.arange(max_len, dtype=torch.float64), inv)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, height, width) for a head of ``head_dim``."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """RMS norm in float32, weight included; output in ``x``'s dtype (one rounding, not two)."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


class WanLayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x):
        """Layer norm in float32, weights included, as Wan runs under autocast; output in ``x``'s dtype."""
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class WanAttention(nn.Module):
    """Projections of one attention layer (``q``, ``k``, ``v``, ``o``, ``norm_q``, ``norm_k``).

    The attention itself is done by the model that owns the block: the reference and the
    graph-safe model differ exactly there.

    ``fused`` names projections that run as one GEMM (``("q", "k", "v")`` for self-attention,
    ``("k", "v")`` for cross-attention): their weights and biases live in one buffer each
    (``fused_weight`` [n * dim, dim], ``fused_bias``; not in the state dict) and the linears'
    parameters are views of its rows, so the state dict (keys, shapes, values) is the plain
    one, ``load_state_dict`` (in place or ``assign=True``), ``.to()``, ``to_empty`` and
    ``deepcopy`` keep the two in step, and :func:`graphrt.quantize` turns the group into one fp8
    GEMM (a child named ``"".join(fused)``, the members removed). :meth:`projections` runs them.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, fused: tuple[str, ...] = ()):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.fused_linears = tuple(fused)
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self.fuse()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.fuse())

    @property
    def fused_name(self) -> str:
        """The child a quantized group becomes (``"qkv"``, ``"kv"``)."""
        return "".join(self.fused_linears)

    def fuse(self) -> None:
        """Put the ``fused`` linears' weights and biases in one buffer each, the linears' parameters
        views of its rows (values unchanged). A no-op without a group or once it is quantized."""
        names = self.fused_linears
        if not names or self.fused_name in self._modules:
            return
        lins = [self._modules[n] for n in names]
        if any(type(m) is not nn.Linear or m.bias is None for m in lins):
            self.unfuse()
            return
        adjacent = _adjacent_rows([m.weight for m in lins]), _adjacent_rows([m.bias for m in lins])
        if all(t is not None for t in adjacent):     # already rows of one tensor (this module's buffer, or
            self.fused_weight, self.fused_bias = adjacent   # another model's after load_state_dict(assign=True))
            return
        with torch.no_grad():
            w = torch.cat([m.weight.detach() for m in lins])
            b = torch.cat([m.bias.detach() for m in lins])
            rows = [m.out_features for m in lins]
            for m, ws, bs in zip(lins, w.split(rows), b.split(rows)):
                m.weight.data, m.bias.data = ws, bs
        self.fused_weight, self.fused_bias = w, b

    def unfuse(self) -> None:
        """Run the group as separate GEMMs again (the parameters keep their values)."""
        self.fused_weight = self.fused_bias = None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)       # parameters and the buffer are converted apart:
        self.fuse()                             # make the parameters views of one buffer again
        return out

    def __setstate__(self, state):
        super().__setstate__(state)             # deepcopy / unpickle copy each parameter apart
        self.fuse()

    def projections(self, x, names: tuple[str, ...]) -> list[torch.Tensor]:
        """Outputs of the linears ``names`` on ``x`` (before any norm), in order: one GEMM when
        ``names`` is the fused group (views of its [.., n * dim] output), else one each."""
        names = tuple(names)
        fused = self.fused_linears
        if fused and set(names) <= set(fused):
            fp8 = self._modules.get(self.fused_name)
            if names == fused or fp8 is not None:
                if fp8 is not None:
                    y = fp8(x)
                elif self.fused_weight is not None:
                    y = nn.functional.linear(x, self.fused_weight, self.fused_bias)
                else:
                    return [self._modules[n](x) for n in names]
                parts = dict(zip(fused, y.chunk(len(fused), dim=-1)))
                return [parts[n] for n in names]
        return [self._modules[n](x) for n in names]

    def project_q(self, x):
        q, = self.projections(x, ("q",))
        return self.norm_q(q).unflatten(-1, (self.num_heads, self.head_dim))

    def project_kv(self, x):
        k, v = self.projections(x, ("k", "v"))
        k = self.norm_k(k).unflatten(-1, (self.num_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_heads, self.head_dim))
        return k, v

    def project_qkv(self, x):
        """``project_q`` and ``project_kv`` of the same ``x`` (self-attention), one GEMM when fused."""
        q, k, v = self.projections(x, ("q", "k", "v"))
        h = (self.num_heads, self.head_dim)
        return self.norm_q(q).unflatten(-1, h), self.norm_k(k).unflatten(-1, h), v.unflatten(-1, h)

    def out(self, x):
        return self.o(x.flatten(-2))


def _adjacent_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors stacked along dim 0 as one view of their storage when they already lie there
    back to back (contiguous, same storage, dtype and device; no copy), else None. Nothing on
    the meta device has an address: None there."""
    first = tensors[0]
    if first.device.type == "meta" or not all(t.is_contiguous() for t in tensors):
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset or t.dtype != first.dtype
                or t.shape[1:] != first.shape[1:]):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention over text, modulated FFN.

    ``forward`` takes the two attention callables so the reference and the graph-safe model
    share every other line of the block.
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps, fused=("q", "k", "v"))
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps, fused=("k", "v"))
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, self_attn, cross_attn):
        """``x`` [B, L, dim]; ``e0`` [B, 6, dim] float32; ``self_attn(h) / cross_attn(h)`` -> [B, L, dim]."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation + e0.float()).chunk(6, dim=1)
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self_attn(h) * gate).type_as(x)
        x = x + cross_attn(self.norm3(x.float()).type_as(x))
        h = (self.norm2(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation + e.float().unsqueeze(1)).chunk(2, dim=1)
        return self.head((self.norm(x.float()) * (1 + scale) + shift).type_as(x))


class WanModelBase(nn.Module):
    """Parameters of the Wan 2.1 DiT and the parts of its forward that hold no cache logic."""

    fp8_linears = WAN_FP8_LINEARS       # what graphrt.quantize(model, "fp8") converts by default

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.cond_embedding = nn.Linear(cfg.cond_dim, dim) if cfg.cond_dim else None
        self._rope: tuple[torch.Tensor, ...] | None = None
        self.rope_tables(self.patch_embedding.weight.device)

    # -- shapes --------------------------------------------------------------------------
    def check_inputs(self, x, t, context=None):
        """Shape, dtype and device checks on the host (metadata only; no tensor is read)."""
        cfg = self.cfg
        p = self.patch_embedding.weight
        for name, v in (("latents x", x), ("timestep t", t), ("context", context)):
            if v is not None and not isinstance(v, torch.Tensor):
                raise InputError(f"{name} must be a tensor", got=type(v).__name__)
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise InputError("latents have the wrong shape", expected=f"[B, {cfg.in_dim}, F, H, W]",
                             got=list(x.shape), fix="pass latents laid out as [batch, channels, frames, height, width]")
        _, ph, pw = cfg.patch_size
        if x.shape[3] % ph or x.shape[4] % pw:
            raise InputError("latent height/width not divisible by the patch", expected=f"multiples of {(ph, pw)}",
                             got=tuple(x.shape[3:]))
        if t.shape != (x.shape[0],):
            raise InputError("timestep must be one value per batch row", expected=[x.shape[0]], got=list(t.shape))
        for name, v in (("latents x", x), ("timestep t", t), ("context", context)):
            if v is not None and not same_device(v.device, p.device):
                raise InputError(f"{name} is on another device than the model", expected=str(p.device),
                                 got=str(v.device), fix="move the inputs with .to(model device)")
        for name, v in (("latents x", x), ("context", context)):
            if v is not None and v.dtype != p.dtype:
                raise InputError(f"{name} has another dtype than the model", expected=str(p.dtype), got=str(v.dtype),
                                 fix=f"cast with .to({p.dtype})")
        if context is not None and (context.dim() != 3 or context.shape[0] != x.shape[0]
                                    or context.shape[2] != cfg.text_dim):
            raise InputError("text context has the wrong shape", expected=f"[{x.shape[0]}, L, {cfg.text_dim}]",
                             got=list(context.shape))

    # -- embeddings ----------------------------------------------------------------------
    def embed(self, x):
        """Latents [B, C, F, H, W] -> tokens [B, F*h*w, dim] and the grid (f, h, w) as Python ints."""
        x = self.patch_embedding(x)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).contiguous(), grid

    def add_cond(self, x, cond, grid):
        """Add per-frame conditioning ``cond`` [B, F, cond_dim] to each frame's tokens."""
        if cond is None:
            if self.cond_embedding is not None:
                raise InputError("this model takes per-frame conditioning", expected=f"cond [B, F, {self.cfg.cond_dim}]",
                                 got=None, fix="pass cond=... (for example camera poses per latent frame)")
            return x
        if self.cond_embedding is None:
            raise InputError("cond was passed to a model built with cond_dim=0", got=list(cond.shape),
                             fix="build the model with WanConfig(cond_dim=...)")
        b, f = x.shape[0], grid[0]
        if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (b, f, self.cfg.cond_dim):
            raise InputError("cond has the wrong shape", expected=[b, f, self.cfg.cond_dim],
                             got=list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__)
        if not same_device(cond.device, x.device):
            raise InputError("cond is on another device than the model", expected=str(x.device), got=str(cond.device))
        c = self.cond_embedding(cond.to(x.dtype))
        return (x.unflatten(1, (f, -1)) + c.unsqueeze(2)).flatten(1, 2)

    def embed_time(self, t, dtype):
        """Timesteps [B] -> (e [B, dim], e0 [B, 6, dim]) in float32, as in Wan."""
        e = self.time_embedding(sinusoidal_embedding_1d(self.cfg.freq_dim, t).to(dtype)).float()
        e0 = self.time_projection(e.to(dtype)).float().unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_text(self, context):
        return self.text_embedding(context)

    def unpatchify(self, x, grid):
        """Tokens [B, L, p*c] -> latents [B, c, F, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def finish(self, x, e, grid, out_dtype):
        return self.unpatchify(self.head(x, e), grid).to(out_dtype)

    # -- RoPE ----------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Move the RoPE tables along with the parameters (their dtype stays float64)."""
        out = super()._apply(fn, recurse)
        self._rope = None
        self.rope_tables(self.patch_embedding.weight.device)
        return out

    def rope_tables(self, device):
        """Float64 RoPE angles per axis (time, height, width), built once per device.

        Kept outside the module's buffers so ``model.to(bfloat16)`` never rounds them, and
        rebuilt when the model moves, so no forward ever copies them to the device.
        """
        if self._rope is None or self._rope[0].device != device:
            d = self.cfg.head_dim
            self._rope = tuple(rope_angles(ROPE_MAX_LEN, 2 * n).to(device) for n in rope_split(d))
        return self._rope
