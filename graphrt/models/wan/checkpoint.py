"""Wan 2.1 checkpoint layout: loading checkpoints, and conversion to/from diffusers.

The Wan layout is the one the original checkpoints use (``blocks.N.self_attn.q.weight``,
``blocks.N.norm3.weight``, ``head.modulation``, ...). Diffusers' ``WanTransformer3DModel`` names
the same tensors differently and swaps ``norm2``/``norm3``; the tables below are the whole
mapping. The causal Wan projects (Self-Forcing, CausVid) publish ``.pt`` files holding a training
state whose generator weights sit under ``generator``/``generator_ema`` with a ``model.`` prefix;
:func:`load_checkpoint` unwraps those too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from graphrt.errors import CheckpointError

# Wan name -> diffusers name, for the parts outside the blocks.
_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "patch_embedding": "patch_embedding",
}
# Inside ``blocks.N.``: Wan name -> diffusers name.
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # Wan's cross-attention norm is diffusers' norm2
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}


def _rename(name: str, top: dict, block: dict) -> str:
    m = re.match(r"(blocks\.\d+\.)(.+)\.(weight|bias)$", name) or re.match(r"(blocks\.\d+\.)(.+)()$", name)
    if m:
        prefix, mod, leaf = m.groups()
        if mod not in block:
            raise CheckpointError(f"no mapping for block parameter {name!r}")
        return prefix + block[mod] + (f".{leaf}" if leaf else "")
    mod, _, leaf = name.rpartition(".")
    if name in top:  # a bare parameter such as head.modulation
        return top[name]
    if mod not in top:
        raise CheckpointError(f"no mapping for parameter {name!r}")
    return f"{top[mod]}.{leaf}"


def state_dict_to_diffusers(sd: dict) -> dict:
    """Wan-layout state dict -> diffusers ``WanTransformer3DModel`` layout."""
    return {_rename(k, _TOP, _BLOCK): v for k, v in sd.items()}


def state_dict_from_diffusers(sd: dict) -> dict:
    """Diffusers ``WanTransformer3DModel`` state dict -> Wan layout."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    return {_rename(k, top, block): v for k, v in sd.items()}


# Where training checkpoints keep the generator's weights, in the order they are looked for
# (the EMA weights are the ones the projects sample with).
NESTED_KEYS = ("generator_ema", "generator", "model", "state_dict", "module")
# Wrappers' prefixes: the projects' ``self.model = CausalWanModel``, torch.compile, DDP.
_PREFIXES = ("model.", "_orig_mod.", "module.")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise CheckpointError(f"no *.safetensors files in {path}", fix="point at a file or a folder of shards")
    raise CheckpointError(f"checkpoint {path} does not exist")


def _read(shard: Path) -> dict:
    if shard.suffix in _TORCH_SUFFIXES:
        try:
            return torch.load(str(shard), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {shard} as a torch checkpoint: {type(e).__name__}: {e}",
                                  fix="pass a safetensors file, or a .pt holding only tensors and dicts") from e
    from safetensors.torch import load_file

    try:
        return load_file(str(shard))
    except Exception as e:   # safetensors raises its own error types for a file that is not one
        raise CheckpointError(f"cannot read {shard} as safetensors: {type(e).__name__}: {e}",
                              fix="point at a Wan 2.1 .safetensors file (or a folder of them), or a .pt "
                                  "training checkpoint") from e


def unwrap_state_dict(sd: dict, key: str | None = None, *, where: str = "checkpoint") -> dict:
    """The model's flat state dict out of a training checkpoint.

    ``key`` names the nested entry (``"generator_ema"``, ``"generator"``, ...); None takes the
    first of :data:`NESTED_KEYS` present when the top level is not already flat. A common
    wrapper prefix (``model.``, ``_orig_mod.``, ``module.``) is stripped from every key.
    """
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} does not hold a state dict", expected="a dict", got=type(sd).__name__)
    if key is not None:
        if not isinstance(sd.get(key), dict):
            raise CheckpointError(f"{where} has no state dict under {key!r}", expected=f"a dict under {key!r}",
                                  got=f"top-level keys {sorted(sd)[:12]}",
                                  fix="pick one of those keys (or none for a flat state dict)")
        sd = sd[key]
    elif not all(isinstance(v, torch.Tensor) for v in sd.values()):
        nested = next((k for k in NESTED_KEYS if isinstance(sd.get(k), dict)), None)
        if nested is None:
            raise CheckpointError(f"{where} is neither a flat state dict nor a known training checkpoint",
                                  expected=f"tensors, or a dict under one of {NESTED_KEYS}",
                                  got=f"top-level keys {sorted(sd)[:12]}", fix="name the entry with key=...")
        sd = sd[nested]
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {bad[:8]}", fix="name the entry with key=...")
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    key: str | None = None) -> dict:
    """Load a local checkpoint into ``model``: a safetensors file or a folder of shards in the Wan or
    diffusers layout, or a torch ``.pt``/``.pth`` training checkpoint whose weights are nested
    under ``key`` (default: ``generator_ema``, then ``generator``, ...) with a ``model.`` prefix.

    Tensors are cast to each parameter's dtype and device. Missing or unexpected keys and
    shape mismatches raise :class:`CheckpointError` listing them. Returns the loaded state dict.
    """
    sd: dict = {}
    for shard in _shards(Path(path)):
        sd.update(unwrap_state_dict(_read(shard), key, where=str(shard)))
    if any(k.startswith("condition_embedder.") for k in sd):
        sd = state_dict_from_diffusers(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if bad_shape or (strict and (missing or unexpected)):
        parts = [f"missing keys ({len(missing)}): {missing}" if missing else "",
                 f"unexpected keys ({len(unexpected)}): {unexpected}" if unexpected else "",
                 f"shape mismatches: {bad_shape}" if bad_shape else ""]
        raise CheckpointError(f"checkpoint {path} does not match {type(model).__name__}:\n  "
                              + "\n  ".join(p for p in parts if p),
                              fix="check the config (preset, dims, layers) matches the checkpoint")
    sd = {k: v.to(dtype=own[k].dtype, device=own[k].device) for k, v in sd.items() if k in own}
    model.load_state_dict(sd, strict=strict)
    return sd


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict, Wan layout, to one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu()  # host-read-ok: saving a checkpoint copies to the host
               for k, v in model.state_dict().items()}, str(path))
