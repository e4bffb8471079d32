"""A Wan 2.1 text-to-video model as its four parts, loaded from (and written to) a local folder.

The folder is diffusers' layout (``Wan2.1-T2V-1.3B-Diffusers``): ``transformer/`` (config.json +
safetensors), ``vae/`` (``AutoencoderKLWan``), ``text_encoder/`` (``UMT5EncoderModel``) and
``tokenizer/``. The causal DiT's weights come from a separate checkpoint in any layout
:func:`graphrt.models.wan.load_checkpoint` reads (Wan or diffusers safetensors, or the causal
projects' ``.pt`` with ``generator``/``generator_ema`` and a ``model.`` prefix); without one, the
folder's own transformer weights are loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphrt.errors import CheckpointError, ConfigError
from graphrt.models.wan import CausalWan, WanConfig, load_checkpoint, state_dict_to_diffusers

PARTS = ("transformer", "vae", "text_encoder", "tokenizer")


@dataclass(frozen=True)
class VideoShape:
    """The videos an engine is sized for: pixel size, latent frames per chunk, chunks per video."""

    height: int = 480
    width: int = 832
    chunk_frames: int = 3
    chunks: int = 7
    text_len: int = 512

    def wan_config(self, base: WanConfig, space_scale: int) -> WanConfig:
        if self.height % space_scale or self.width % space_scale:
            raise ConfigError(f"a {self.height}x{self.width} video is not a multiple of the VAE's {space_scale}x "
                              "spatial compression", fix=f"use a height and width divisible by {space_scale}")
        return base.replace(height=self.height // space_scale, width=self.width // space_scale,
                            chunk_frames=self.chunk_frames, max_frames=self.chunk_frames * self.chunks,
                            text_len=self.text_len)


@dataclass
class WanComponents:
    """The four parts of a Wan text-to-video model, on one device."""

    dit: CausalWan
    vae: Any                  # diffusers.AutoencoderKLWan
    text_encoder: Any         # transformers.UMT5EncoderModel
    tokenizer: Any


def _vae_space_scale(vae) -> int:
    return 2 ** (len(vae.config.dim_mult) - 1) * (vae.config.patch_size or 1)


def load_wan(folder: str | Path, checkpoint: str | Path | None = None, *, shape: VideoShape = VideoShape(),
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, attention: str = "auto",
             checkpoint_key: str | None = None) -> WanComponents:
    """Load a local diffusers-format Wan 2.1 folder, the DiT from ``checkpoint`` when given.

    Nothing is downloaded. A missing part, or DiT weights that do not match the transformer's
    config (missing, extra or mis-shaped keys), raises :class:`CheckpointError` naming them.
    """
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(folder)
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(f"{folder} is not a diffusers-format Wan folder: no {', '.join(p + '/' for p in missing)}",
                              expected=f"sub-folders {', '.join(p + '/' for p in PARTS)}",
                              fix="download e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers once and point --model at it")
    config_path = folder / "transformer" / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    vae = AutoencoderKLWan.from_pretrained(str(folder / "vae"), torch_dtype=dtype, local_files_only=True)
    cfg = shape.wan_config(WanConfig.from_diffusers(json.loads(config_path.read_text())), _vae_space_scale(vae))
    if cfg.out_dim != vae.config.z_dim:
        raise ConfigError(f"the DiT outputs {cfg.out_dim} latent channels but the VAE takes {vae.config.z_dim}",
                          fix="use the transformer and VAE of one model")
    with torch.device("meta"):              # no random init of weights the checkpoint replaces
        dit = CausalWan(cfg, attention=attention)
    dit = dit.to_empty(device=device).to(dtype)
    load_checkpoint(dit, checkpoint if checkpoint is not None else folder / "transformer", key=checkpoint_key)
    text_encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype, local_files_only=True)
    if text_encoder.config.d_model != cfg.text_dim:
        raise ConfigError(f"the text encoder gives {text_encoder.config.d_model}-dim states but the DiT reads "
                          f"{cfg.text_dim}", fix="use the text encoder of the same model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    return WanComponents(dit.eval(), vae.to(device).eval(), text_encoder.to(device).eval(), tokenizer)


def diffusers_transformer_config(cfg: WanConfig) -> dict:
    """``WanTransformer3DModel``'s config.json for a :class:`WanConfig`."""
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim,
            "out_channels": cfg.out_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
            "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "eps": cfg.eps, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


def save_wan(parts: WanComponents, folder: str | Path) -> Path:
    """Write ``parts`` as a diffusers-format folder that :func:`load_wan` (and diffusers) reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(diffusers_transformer_config(parts.dit.cfg),
                                                                   indent=2))
    sd = state_dict_to_diffusers(parts.dit.state_dict())
    save_file({k: v.detach().contiguous().cpu()  # host-read-ok: writing a checkpoint copies to the host
               for k, v in sd.items()}, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    parts.vae.save_pretrained(str(folder / "vae"))
    parts.text_encoder.save_pretrained(str(folder / "text_encoder"))
    parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}, indent=2))
    return folder
