"""Hand-fused kernels as ``torch.library`` custom ops (namespace ``graphrt``).

Each op has an aten reference (the exact unfused math of the Wan model, run on the CPU and used
to check the kernel), a fake implementation (so tracing, inductor and graph capture see one op)
and a Triton kernel, run on CUDA and, under ``TRITON_INTERPRET=1``, on the CPU. No op reads a
device value on the host.

- :func:`rms_norm`, :func:`rms_norm_rope`: q/k RMS norm, and RoPE with it (``graphrt/kernels/rope.py``);
- :func:`layer_norm_mod`: LayerNorm + ``* (1 + scale) + shift`` + the cast (``norm.py``);
- :func:`gate_residual`, :func:`gate_residual_norm`: ``x + y * gate``, and the next
  modulated LayerNorm with it (``residual.py``);
- ``sage.py``: int8-QK attention (``attention="sage"``), the custom op ``graphrt::sage_attention``.

An inductor build on the CPU traces each op as its reference (:func:`graphrt.capture.decompose_on_cpu`),
so inductor fuses the chain itself there instead of calling one opaque op between its kernels.
"""
import torch

from graphrt.capture import decompose_on_cpu
from graphrt.kernels._launch import triton_available, use_triton
from graphrt.kernels.norm import layer_norm_mod, layer_norm_mod_reference
from graphrt.kernels.residual import (gate_residual, gate_residual_norm, gate_residual_norm_reference,
                                      gate_residual_reference)
from graphrt.kernels.rope import apply_rope, rms_norm, rms_norm_reference, rms_norm_rope, rms_norm_rope_reference

for _op, _reference in ((torch.ops.graphrt.rms_norm, rms_norm_reference),
                        (torch.ops.graphrt.rms_norm_rope, rms_norm_rope_reference),
                        (torch.ops.graphrt.layer_norm_mod, layer_norm_mod_reference),
                        (torch.ops.graphrt.gate_residual, gate_residual_reference),
                        (torch.ops.graphrt.gate_residual_norm, gate_residual_norm_reference)):
    decompose_on_cpu(_op.default, _reference)

__all__ = ["apply_rope", "gate_residual", "gate_residual_norm", "gate_residual_norm_reference",
           "gate_residual_reference", "layer_norm_mod", "layer_norm_mod_reference", "rms_norm", "rms_norm_reference", "rms_norm_rope",
           "rms_norm_rope_reference", "triton_available", "use_triton"]
