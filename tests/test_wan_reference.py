"""The upstream-style reference: parity with diffusers, block-causal chunking, sliding window, checkpoints."""
import pytest
import torch

from conftest import rel_err
from graphrt.errors import CheckpointError, ConfigError
from graphrt.models.wan import (ReferenceWan, WanConfig, load_checkpoint, save_checkpoint,
                                state_dict_from_diffusers, state_dict_to_diffusers)


def test_presets():
    c = WanConfig.preset("wan-1.3b")
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim, c.freq_dim) == (1536, 30, 12, 8960, 256)
    assert (c.text_dim, c.text_len, c.patch_size, c.in_dim, c.out_dim, c.eps) == (4096, 512, (1, 2, 2), 16, 16, 1e-6)
    assert c.qk_norm and c.cross_attn_norm and c.chunk_frames == 3 and c.max_frames == 21
    assert c.frame_tokens == 1560  # 480x832 video -> 60x104 latent -> 30x52 patches
    c = WanConfig.preset("wan-14b")
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim) == (5120, 40, 40, 13824)
    with pytest.raises(ConfigError, match="unknown Wan preset"):
        WanConfig.preset("wan-99b")
    with pytest.raises(ConfigError, match="max_frames"):
        WanConfig.preset("tiny", max_frames=20)


def test_wan_checkpoint_layout(cfg):
    keys = set(ReferenceWan(cfg).state_dict())
    for k in ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
              "time_projection.1.weight", "head.head.weight", "head.modulation", "blocks.0.self_attn.q.weight",
              "blocks.0.self_attn.norm_q.weight", "blocks.0.cross_attn.o.bias", "blocks.1.norm3.weight",
              "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias", "blocks.1.modulation"]:
        assert k in keys, k
    assert not any("norm1" in k or "norm2" in k for k in keys)  # affine-free, as in Wan


def _diffusers_model(cfg):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps).eval()


@torch.no_grad()
def test_parity_with_diffusers(cfg):
    """One chunk spanning all frames equals diffusers' WanTransformer3DModel (fp32, <= 1e-5).

    diffusers computes the timestep sinusoid in float32 and Wan in float64: their difference
    grows with t (about 1e-5 relative at t = 1000), so timesteps here stay below 1000.
    """
    ref = ReferenceWan(cfg).eval()
    for p in ref.parameters():  # larger than default init, so every path matters numerically
        torch.nn.init.normal_(p, std=0.2 if p.dim() > 1 else 0.5)
    dif = _diffusers_model(cfg)
    dif.load_state_dict(state_dict_to_diffusers(ref.state_dict()), strict=True)
    assert state_dict_from_diffusers(dif.state_dict()).keys() == ref.state_dict().keys()
    x = torch.randn(2, cfg.in_dim, 6, cfg.height, cfg.width)
    t = torch.tensor([937.0, 321.0])
    context = torch.randn(2, cfg.text_len, cfg.text_dim)
    ours = ref(x, t, context)
    theirs = dif(x, t, context, return_dict=False)[0]
    assert ours.shape == theirs.shape == x.shape
    assert rel_err(ours, theirs) <= 1e-5


def _visibility(cfg, chunks, window=None, sink=0):
    """Boolean [L, L] token visibility: block-causal by chunk, optionally a sink + window."""
    T, n = cfg.frame_tokens, cfg.chunk_frames * cfg.frame_tokens
    q = torch.arange(chunks * n)
    end = (q // n + 1) * n                      # exclusive end of the query's chunk
    j = torch.arange(chunks * n)[None]
    vis = j < end[:, None]
    if window is not None:
        vis &= (j < sink * T) | (j >= end[:, None] - (window - sink) * T)
    return vis


@pytest.mark.parametrize("window,sink", [(None, 0), (9, 3), (6, 0)])
@torch.no_grad()
def test_chunked_equals_teacher_forced(cfg, window, sink):
    """Chunk by chunk with the KV cache == one forward over the whole video under the same mask."""
    chunks = 7
    ref = ReferenceWan(cfg, local_attn_size=window or -1, sink_size=sink).eval()
    x = torch.randn(1, cfg.in_dim, chunks * cfg.chunk_frames, cfg.height, cfg.width)
    t = torch.tensor([500.0])
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    full = ref(x, t, context, attn_mask=_visibility(cfg, chunks, window, sink))
    kv, cross = ref.init_caches(1)
    n = cfg.chunk_frames
    for c in range(chunks):
        out = ref(x[:, :, c * n:(c + 1) * n], t, context, kv, cross, current_start=c * n * cfg.frame_tokens)
        assert rel_err(out, full[:, :, c * n:(c + 1) * n]) <= 1e-5, f"chunk {c}"
    if window is not None:  # the cache really evicted: it holds only the window
        assert kv[0]["k"].shape[1] == window * cfg.frame_tokens


def test_checkpoint_round_trip(cfg, tmp_path):
    ref = ReferenceWan(cfg)
    save_checkpoint(ref, tmp_path / "wan.safetensors")
    other = ReferenceWan(cfg)
    load_checkpoint(other, tmp_path / "wan.safetensors")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_checkpoint_shards_and_diffusers_layout(cfg, tmp_path):
    from safetensors.torch import save_file

    ref = ReferenceWan(cfg)
    sd = {k: v.contiguous() for k, v in state_dict_to_diffusers(ref.state_dict()).items()}
    names = sorted(sd)
    (tmp_path / "shards").mkdir()
    save_file({k: sd[k] for k in names[::2]}, str(tmp_path / "shards" / "a.safetensors"))
    save_file({k: sd[k] for k in names[1::2]}, str(tmp_path / "shards" / "b.safetensors"))
    other = ReferenceWan(cfg)
    load_checkpoint(other, tmp_path / "shards")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_checkpoint_missing_key_is_named(cfg, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in ReferenceWan(cfg).state_dict().items()}
    del sd["blocks.1.cross_attn.k.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*blocks\.1\.cross_attn\.k\.weight"):
        load_checkpoint(ReferenceWan(cfg), tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(ReferenceWan(cfg), tmp_path / "nope.safetensors")
    big = ReferenceWan(cfg.replace(num_layers=3))
    save_checkpoint(big, tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.2\."):
        load_checkpoint(ReferenceWan(cfg), tmp_path / "big.safetensors")
