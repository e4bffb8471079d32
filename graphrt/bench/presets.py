"""What ``python -m graphrt.bench`` runs: its modes, the model presets and :class:`BenchConfig`
(every setting, checked up front by :meth:`BenchConfig.resolve`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from graphrt.errors import ConfigError
from graphrt.kv import resolve_kv_dtype
from graphrt.models.wan import WanConfig
from graphrt.pipeline.engine import KV_BUCKETS

LINEAR_DTYPES = ("bf16", "fp8")      # --linear-dtype: "fp8" adds a "<mode>:fp8" row beside each mode
FP8_SUFFIX = ":fp8"

FUSED_MODES = ("graphs+fused", "chunk-graph+fused")
MODES = ("reference", "eager", "graphs", "chunk-graph", *FUSED_MODES, "graphs+inductor", "chunk-graph+inductor",
         "compile", "compile-chunk")
GRAPH_MODES = ("graphs", "chunk-graph", *FUSED_MODES, "graphs+inductor", "chunk-graph+inductor")
PEERS = ("compile", "compile-chunk")
# the fused modes are graphrt's GPU default: inductor's kernels with the fused ops, in the graph
INDUCTOR_MODES = ("graphs+inductor", "chunk-graph+inductor", *FUSED_MODES)
# the published comparison point: the 6th chunk of a video (KV 18 latent frames at 480p, 3 per chunk)
COMPARISON_CHUNK = 6


def kernels_for(mode: str) -> str:
    """The kernel path a mode builds its model with: ``"fused"`` for the modes named so, ``"aten"``
    for every other (today's modes, like for like)."""
    return "fused" if mode in FUSED_MODES else "aten"


def default_modes(device: torch.device) -> tuple[str, ...]:
    """The modes a run without ``--modes`` measures: all of them on CUDA; on the CPU all but the
    fused ones: there inductor traces each fused op as its aten reference and fuses it itself, so
    they compile and time what the ``+inductor`` modes do again (``bench/results/fused-cpu.md``
    compares them); ask for them by name."""
    return MODES if device.type == "cuda" else tuple(m for m in MODES if m not in FUSED_MODES)


VIDEO_FRAMES_PER_LATENT = 4


@dataclass(frozen=True)
class Preset:
    model: str                 # WanConfig preset
    height: int                # latent size
    width: int
    chunk_frames: int
    chunks: int
    steps: int = 4
    dtype: str = "bfloat16"
    repeats: int = 1           # extra whole videos timed after the first (steady-state samples)
    layers: int | None = None  # fewer layers than the model preset (a CPU-sized slice of a wide model)

    def config(self, chunks: int | None = None) -> WanConfig:
        n = chunks or self.chunks
        extra = {} if self.layers is None else {"num_layers": self.layers}
        return WanConfig.preset(self.model, height=self.height, width=self.width, chunk_frames=self.chunk_frames,
                                max_frames=n * self.chunk_frames, **extra)


PRESETS = {
    "tiny": Preset("tiny", 8, 8, 3, 2, dtype="float32", repeats=3),
    "wan-1.3b-480p": Preset("wan-1.3b", 60, 104, 3, 7),       # 480x832 video: 1560 tokens per latent frame
    "wan-1.3b-240p-f1": Preset("wan-1.3b", 30, 52, 1, 7),     # 240x416, one latent frame per chunk
    # Wan 1.3B width (dim 1536, 12 heads, ffn 8960, text 512 x 4096) at 64x64 video, one latent
    # frame per chunk, 2 of its 30 layers: CPU-sized, so every mode compiles in minutes
    "wan-1.3b-width-cpu": Preset("wan-1.3b", 8, 8, 1, 3, dtype="float32", repeats=4, layers=2),
    "wan-14b-480p": Preset("wan-14b", 60, 104, 3, 7),
}


@dataclass
class BenchConfig:
    preset: str = "auto"
    device: str | None = None
    batch: int = 1
    chunks: int | None = None
    steps: int | None = None
    layers: int | None = None      # fewer transformer layers than the preset (a slice of the model)
    dtype: str | None = None
    attention: str = "auto"
    modes: tuple[str, ...] | None = None   # None: default_modes(device)
    checkpoint: str | None = None
    repeats: int | None = None
    seed: int = 0
    threads: int | None = None     # torch threads; None: 1 on the CPU (stable timings), torch's own on CUDA
    cache_dir: str | None = None   # compiled graphs on disk; None: a fresh folder for this run (cold means cold)
    kv_buckets: str = "auto"       # Engine(kv_buckets=...): "per-length", "max" (one graph per batch size), "auto"
    head_to_head: bool = True      # CPU: rerun the goal's two modes in turn (the same load for both)
    progress: bool = True
    kv_dtype: str | None = None           # None: the model dtype
    linear_dtype: str = "bf16"            # "fp8": each mode also runs with fp8 linears (a "<mode>:fp8" row)
    sp: int = 1                # sequence-parallel ranks (under torchrun); every rank runs, rank 0 reports

    def with_modes(self) -> "BenchConfig":
        """This config checked (:meth:`resolve`), with ``modes`` filled in (:func:`default_modes`) when None."""
        _, _, device, _ = self.resolve()
        return self if self.modes is not None else replace(self, modes=default_modes(device))

    @property
    def rows(self) -> tuple[str, ...]:
        """The modes as run: each followed by its ``"<mode>:fp8"`` row with ``linear_dtype="fp8"``
        (the reference has none: it is the unquantized baseline)."""
        if self.linear_dtype != "fp8":
            return tuple(self.modes)
        return tuple(r for m in self.modes for r in ((m,) if m == "reference" else (m, m + FP8_SUFFIX)))

    def resolve(self) -> tuple[str, Preset, torch.device, torch.dtype]:
        """Check every setting up front; raise :class:`ConfigError` naming the first bad one."""
        device = _device(self.device)
        name = self.preset if self.preset != "auto" else ("wan-1.3b-480p" if device.type == "cuda" else "tiny")
        if name not in PRESETS:
            raise ConfigError(f"unknown bench preset {name!r}", expected=sorted(PRESETS) + ["auto"], got=name)
        if self.modes is not None and not self.modes:
            raise ConfigError("no mode to run", expected=f"a comma-separated subset of {','.join(MODES)}")
        if not isinstance(self.sp, int) or self.sp < 1:
            raise ConfigError("--sp must be an int >= 1", got=self.sp)
        modes = self.modes if self.modes is not None else default_modes(device)
        unknown = set(modes) - set(MODES)
        if unknown:
            raise ConfigError(f"unknown mode(s) {sorted(unknown)}", expected=MODES)
        if len(set(modes)) != len(modes):
            raise ConfigError("a mode is listed twice", got=",".join(modes))
        for what, value, least in (("batch", self.batch, 1), ("chunks", self.chunks, 1), ("steps", self.steps, 1),
                                   ("layers", self.layers, 1),
                                   ("repeats", self.repeats, 0), ("threads", self.threads, 1)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise ConfigError(f"--{what} must be an int >= {least}", got=value)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= 2 ** 63 - self.batch:
            raise ConfigError("--seed must be an int in [0, 2**63 - batch] (row i of the batch gets seed + i)",
                              got=self.seed)
        if self.linear_dtype not in LINEAR_DTYPES:
            raise ConfigError(f"unknown --linear-dtype {self.linear_dtype!r}", expected=LINEAR_DTYPES,
                              got=self.linear_dtype)
        if self.kv_buckets not in KV_BUCKETS:
            raise ConfigError(f"unknown --kv-buckets {self.kv_buckets!r}", expected=KV_BUCKETS)
        if self.cache_dir is not None and not os.path.isdir(self.cache_dir):
            raise ConfigError("--cache-dir is not a folder", got=self.cache_dir, fix="create it first")
        if self.checkpoint is not None and not os.path.exists(self.checkpoint):
            raise ConfigError("checkpoint not found", got=self.checkpoint,
                              fix="pass a Wan 2.1 .safetensors file or a folder of shards")
        p = PRESETS[name]
        dtype = getattr(torch, self.dtype or p.dtype)
        resolve_kv_dtype(self.kv_dtype, dtype)
        return name, p, device, dtype


def _device(name: str | None) -> torch.device:
    """``None`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ConfigError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}", expected="cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"the bench runs on cpu or cuda, not {device.type}", got=name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"device {name!r} is not available: this machine has {count} CUDA device(s)",
                              fix="use --device cpu, or run on a machine with a GPU")
    return device
