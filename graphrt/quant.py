"""FP8 linears for any model: :func:`quantize` (``graphrt.quantize``) swaps ``nn.Linear`` for :class:`Fp8Linear`.

An :class:`Fp8Linear` holds float8 e4m3 weights with one float32 scale per output channel, made
once when the model is quantized. Its forward computes one scale per token of the activation on
the device (an ``amax`` over the row, no host value: graph-safe), quantizes the activation to e4m3
and multiplies with ``torch._scaled_mm`` row-wise (per-token x per-channel scales), which runs on
the CPU in torch >= 2.10 as well as on CUDA (sm_89+).

torchao's float8 (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``, the
well-kept library for this) is not used: in torchao 0.18 its ``quantize_`` refuses the CPU with
``AssertionError: Float8 dynamic quantization requires CUDA compute capability ≥8.9 or MI300+ or
XPU.``, so a model quantized with it could not be built, checked or tested here. The arithmetic
below is the same recipe (row-wise activation and weight scales, e4m3, ``_scaled_mm``).

What the error tests and ``bench/results/fp8-cpu.md`` measure is the error of this arithmetic on
random weights. Random weights cannot show the quality cost on real weights (trained weights
have outlier channels that random ones lack); measure that on a checkpoint.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from graphrt.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max            # 448
# a zero row (a padded token) gets this amax, so its scale is never zero
_AMAX_FLOOR = 1e-12

# Wan's linears that run in fp8: self-attention q/k/v/o, cross-attention q/o and the FFN. The
# prompt's cross-attention K/V (``cross_attn.k``/``cross_attn.v``) stay as they are: they run once
# per prompt, and the prompt cache holds their outputs.
WAN_FP8_LINEARS = ("blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
                   "blocks.*.cross_attn.q", "blocks.*.cross_attn.o", "blocks.*.ffn.0", "blocks.*.ffn.2")


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [N, K] -> (e4m3 [N, K], float32 scale [N, 1]) with ``t ~= q * scale`` row by row."""
    # three kernels in eager (a max-norm reduction, a divide into float32, a cast), no abs() copy
    # and no clamp: |t| / (amax / 448) is at most 448 plus one float32 rounding, which the cast
    # rounds to 448 (e4m3fn overflows only from 480 up)
    amax = torch.linalg.vector_norm(t.detach(), float("inf"), dim=-1, keepdim=True)
    scale = amax.float().clamp_min(_AMAX_FLOOR) / FP8_MAX
    return (t / scale).to(FP8), scale


class Fp8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` in e4m3 (per-output-channel scales) and ``x`` quantized per
    token on the device in every forward. Output in ``x``'s dtype (bfloat16 out of the GEMM on
    CUDA, where row-wise ``_scaled_mm`` has no other output dtype).

    Buffers: ``weight`` (float8_e4m3fn [out, in]), ``weight_scale`` (float32 [out, 1]) and, from
    the linear, ``bias`` (a parameter without grad, sharing the linear's storage). Inference only:
    no gradient flows through it. ``model.to(dtype)`` moves them between devices but keeps
    their dtypes, so fp8 weights and float32 scales are never rounded.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w, scale = _rowwise_fp8(linear.weight)
        self.register_buffer("weight", w)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference only: _scaled_mm has no derivative. Inductor in torch 2.13 refuses it in grad
        # mode even so ("derivative for aten::_scaled_mm is not implemented"): compile it under
        # torch.no_grad(), as graphrt's capture and the Engine do
        xq, x_scale = _rowwise_fp8(x.detach().reshape(-1, self.in_features))
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else x.dtype
        bias = self.bias if self.bias is not None and self.bias.dtype == out_dtype else None
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(), bias=bias,
                             out_dtype=out_dtype).to(x.dtype)
        if self.bias is not None and bias is None:
            y = y + self.bias
        return y.unflatten(0, x.shape[:-1])

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        out = super()._apply(fn, recurse)
        for name, b in self._buffers.items():    # a device move is kept; a dtype cast is not
            if b is not None and b.dtype != before[name].dtype:
                self._buffers[name] = before[name].to(b.device)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3"


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: the converted linears, the ones left out (with why) and the
    model's weight bytes (:func:`weight_bytes`) before and after."""
    dtype: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mb = 2 ** 20
        lines = [f"{self.dtype}: {len(self.converted)} linear(s) converted, weights {self.bytes_before / mb:.2f} MiB "
                 f"-> {self.bytes_after / mb:.2f} MiB"]
        lines += [f"  skipped {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and persistent buffers; shared tensors counted once;
    on the meta device, where nothing has an address, every tensor once)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = id(t) if t.device.type == "meta" else (t.device, t.data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _default_include(model: nn.Module):
    """The model's own list (a class attribute ``fp8_linears``, as Wan models declare
    :data:`WAN_FP8_LINEARS`), else every linear."""
    return tuple(getattr(model, "fp8_linears", None) or ("*",))


def _quantize_fused_groups(model: nn.Module, selected, report: QuantizeReport) -> None:
    """Linears that run as one GEMM (a module with ``fused_linears`` and a ``fused_weight``, as Wan's
    q/k/v): when every member is selected, one :class:`Fp8Linear` over the fused weight (one
    activation quantization, one GEMM) replaces the members, as the child ``fused_name``; when
    only some are, the group runs unfused and its members are converted one by one."""
    groups = [(n, m) for n, m in model.named_modules()
              if getattr(m, "fused_linears", ()) and getattr(m, "fused_weight", None) is not None]
    for name, mod in groups:
        members = [f"{name}.{n}" if name else n for n in mod.fused_linears]
        picked = [selected(n) for n in members]
        w = mod.fused_weight
        if not all(picked) or w.shape[0] % 16 or w.shape[1] % 16:
            if any(picked):
                mod.unfuse()
            continue
        stacked = SimpleNamespace(in_features=w.shape[1], out_features=w.shape[0], weight=w, bias=mod.fused_bias)
        with torch.no_grad():
            fp8 = Fp8Linear(stacked)
        for n in mod.fused_linears:
            delattr(mod, n)
        mod.unfuse()
        setattr(mod, mod.fused_name, fp8)
        report.converted.append(f"{name}.{mod.fused_name}" if name else mod.fused_name)


def quantize(model: nn.Module, dtype: str = "fp8", *, include=None, exclude=()) -> QuantizeReport:
    """Replace ``model``'s ``nn.Linear`` modules by :class:`Fp8Linear`, in place.

    - ``include``: glob patterns on the modules' qualified names (``"blocks.*.ffn.0"``); None
      means the model's ``fp8_linears`` (:data:`WAN_FP8_LINEARS` for a Wan model) and every linear otherwise.
    - ``exclude``: patterns left as they are even when included (``"lm_head"``).

    Run it once after the weights are loaded (the fp8 weights and their scales are made here;
    ``load_state_dict`` of an unquantized checkpoint into the quantized model does not fit). A
    linear whose ``in_features`` or ``out_features`` is not a multiple of 16 (what ``_scaled_mm``
    needs on CUDA) is skipped and listed in the report. Linears that run as one GEMM (Wan's
    self-attention q/k/v) become one fp8 GEMM when all of them are included (reported under the
    group's name, ``blocks.N.self_attn.qkv``).
    """
    if dtype != "fp8":
        raise ConfigError(f"unknown linear dtype {dtype!r}", where="graphrt.quantize", expected="'fp8'", got=dtype,
                          fix="graphrt.quantize(model, 'fp8')")
    include = tuple(_default_include(model) if include is None else ((include,) if isinstance(include, str) else include))
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    report = QuantizeReport(dtype, bytes_before=weight_bytes(model))
    def selected(n):
        return any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)

    _quantize_fused_groups(model, selected, report)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and selected(n)]
    for name, lin in targets:
        if lin.in_features % 16 or lin.out_features % 16:
            report.skipped[name] = f"{lin.in_features}x{lin.out_features}: _scaled_mm needs multiples of 16"
            continue
        parent, _, attr = name.rpartition(".")
        with torch.no_grad():
            setattr(model.get_submodule(parent) if parent else model, attr, Fp8Linear(lin))
        report.converted.append(name)
    if not report.converted:
        raise ConfigError("quantize converted no linear", where="graphrt.quantize",
                          expected=f"nn.Linear modules matching {include} and not {exclude}",
                          got=f"{len(report.skipped)} skipped, none matched otherwise",
                          fix="check the include/exclude patterns against model.named_modules()")
    report.bytes_after = weight_bytes(model)
    model.quantize_report = report          # what the Engine's memory() reports for a model quantized before
    return report
