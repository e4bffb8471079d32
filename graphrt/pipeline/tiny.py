"""A tiny random Wan text-to-video model (DiT, VAE, umT5, tokenizer) built from configs, no downloads.

It runs the whole path on a CPU in seconds: ``python -m graphrt.generate`` uses it when no model
folder is given, and the tests write it to disk with :func:`graphrt.pipeline.weights.save_wan` and
load it back. Its weights are random, so its videos are noise; their shape, order and plumbing
are the real thing.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline.weights import VideoShape, WanComponents

_WORDS = "a the of and in on with red green blue fox cat dog bird runs flies through snow forest city night".split()


@dataclass(frozen=True)
class RandomSpec:
    """Sizes of a random model; the defaults (the tiny model) decode 8x8 latents to 64x64 frames.
    ``RandomSpec("wan-1.3b", (), 96, (1, 2, 4, 4), vae_res_blocks=2)`` has Wan 2.1 1.3B's DiT and VAE
    (with a one-layer text encoder: the prompt is encoded once, outside the timed loop)."""

    dit: str = "tiny"                 # WanConfig preset
    dit_overrides: tuple = ()         # (field, value) pairs changing the preset
    vae_dim: int = 8                  # AutoencoderKLWan base_dim (Wan 2.1: 96)
    vae_mult: tuple[int, ...] = (1, 2, 2, 2)
    vae_res_blocks: int = 1           # Wan 2.1: 2
    text_layers: int = 2


def tiny_tokenizer():
    """A umT5-style (T5, Unigram) tokenizer over letters, digits, punctuation and a few words."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -5.0) for c in string.ascii_letters]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(dim: int, layers: int = 2):
    """A random umT5 encoder with ``dim``-wide states and its tokenizer (:func:`tiny_tokenizer`)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu"))
    return encoder.eval(), tokenizer


def tiny_wan(shape: VideoShape | None = None, spec: RandomSpec = RandomSpec(), *, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanComponents:
    """Random components sized for ``shape`` (default: the preset's latent size, 3-frame chunks,
    7 chunks), built on ``device``: the tiny model unless ``spec`` says otherwise."""
    from diffusers import AutoencoderKLWan

    base = WanConfig.preset(spec.dit, **dict(spec.dit_overrides))
    scale = 2 ** (len(spec.vae_mult) - 1)
    # the tiny preset's 8 text tokens would cut most prompts short
    shape = shape or VideoShape(height=base.height * scale, width=base.width * scale,
                                text_len=max(base.text_len, 16))
    cfg = shape.wan_config(base, scale)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)              # building a model does not move the caller's RNG
        dit = CausalWan(cfg)
        vae = AutoencoderKLWan(base_dim=spec.vae_dim, z_dim=cfg.out_dim, dim_mult=list(spec.vae_mult),
                               num_res_blocks=spec.vae_res_blocks, latents_mean=[0.1 * i for i in range(cfg.out_dim)],
                               latents_std=[1.0 + 0.1 * i for i in range(cfg.out_dim)])
        text, tokenizer = tiny_text_encoder(cfg.text_dim, spec.text_layers)
    parts = (dit, vae, text)
    if dtype != torch.float32:
        parts = tuple(m.to(dtype=dtype) for m in parts)
    return WanComponents(parts[0].eval(), parts[1].eval(), parts[2].eval(), tokenizer)
