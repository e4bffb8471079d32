"""Wan 2.1 DiT configurations, with field names as in the original Wan configs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from graphrt.errors import ConfigError


@dataclass(frozen=True)
class WanConfig:
    """Shape of a causal Wan 2.1 DiT.

    Field names follow the original Wan configs. ``chunk_frames`` (latent frames per
    autoregressive chunk) and ``max_frames`` (latent frames per video) are part of the
    config because every static buffer and every graph bucket is sized from them.
    ``cond_dim`` > 0 adds a per-frame conditioning input (for example a camera pose per
    latent frame) projected by ``cond_embedding`` and added to that frame's tokens; 0 keeps
    the plain Wan 2.1 layout. ``height`` and ``width`` are the latent size the presets are meant for (the model
    itself accepts any size divisible by the patch).
    """

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    cond_dim: int = 0
    chunk_frames: int = 3
    max_frames: int = 21
    height: int = 60
    width: int = 104

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim={self.head_dim} must be even and >= 6 for 3-D RoPE")
        if self.max_frames % self.chunk_frames:
            raise ConfigError(
                f"max_frames={self.max_frames} must be a multiple of chunk_frames={self.chunk_frames}")
        if self.patch_size[0] != 1:
            raise ConfigError(f"patch_size={self.patch_size}: only a temporal patch of 1 is supported")
        ph, pw = self.patch_size[1:]
        if self.height % ph or self.width % pw:
            raise ConfigError(f"latent {self.height}x{self.width} is not divisible by patch {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def frame_tokens(self) -> int:
        """Tokens per latent frame at the config's latent size."""
        return (self.height // self.patch_size[1]) * (self.width // self.patch_size[2])

    @property
    def num_chunks(self) -> int:
        return self.max_frames // self.chunk_frames

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "WanConfig":
        """The config of a diffusers ``WanTransformer3DModel`` (its ``config.json`` as a dict);
        ``overrides`` set what diffusers does not store (``chunk_frames``, ``max_frames``,
        ``height``, ``width``, ``text_len``)."""
        known = {"num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim", "freq_dim", "text_dim"}
        missing = sorted(known - set(config))
        if missing:
            raise ConfigError(f"not a WanTransformer3DModel config: it lacks {missing}")
        unsupported = {k: config[k] for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                       if config.get(k) is not None}
        if unsupported:
            raise ConfigError(f"image-conditioned Wan variants are not supported: {unsupported}",
                              fix="use a text-to-video Wan 2.1 transformer")
        if config.get("qk_norm") not in (None, "rms_norm_across_heads"):
            raise ConfigError(f"qk_norm={config['qk_norm']!r} is not Wan 2.1's", expected="'rms_norm_across_heads' or None")
        heads = config["num_attention_heads"]
        fields = dict(dim=heads * config["attention_head_dim"], num_heads=heads, num_layers=config["num_layers"],
                      ffn_dim=config["ffn_dim"], freq_dim=config["freq_dim"], text_dim=config["text_dim"],
                      in_dim=config.get("in_channels", 16), out_dim=config.get("out_channels", 16),
                      patch_size=tuple(config.get("patch_size", (1, 2, 2))), eps=config.get("eps", 1e-6),
                      qk_norm=config.get("qk_norm") is not None,
                      cross_attn_norm=bool(config.get("cross_attn_norm", True)))
        return cls(**{**fields, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "WanConfig":
        """``"tiny"`` (CPU tests), ``"wan-1.3b"`` or ``"wan-14b"``; keyword overrides win."""
        try:
            base = _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown Wan preset {name!r}; known: {sorted(_PRESETS)}") from None
        return dataclasses.replace(base, **overrides)


_PRESETS = {
    "tiny": WanConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_dim=32,
                      text_len=8, in_dim=4, out_dim=4, height=8, width=8),
    "wan-1.3b": WanConfig(),
    "wan-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
