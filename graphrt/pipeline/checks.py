"""The Engine's argument checks: batch buckets, text contexts, video lengths and seeds, session
lists. Each raises an :class:`~graphrt.errors.InputError` (or :class:`~graphrt.errors.CacheError`)
that says what, where, expected/got and how to fix, before any work."""
from __future__ import annotations

import torch

from graphrt.capture import call_unwatched

from graphrt.errors import CacheError, ConfigError, InputError


def is_int(x) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def batch_sizes(sizes) -> tuple[int, ...] | None:
    """Batch buckets as sorted distinct ints >= 1 (a repeat would capture its graphs twice), or None."""
    if sizes is None:
        return None
    want = "a non-empty sequence of ints >= 1, e.g. (1, 2, 4)"
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise InputError("batch_sizes must be a sequence of ints", expected=want, got=sizes)
    sizes = tuple(sizes)
    if not sizes:
        raise InputError("batch_sizes is empty", expected=want, got=sizes)
    bad = [b for b in sizes if not is_int(b) or b < 1]
    if bad:
        raise InputError(f"batch sizes must be ints >= 1; got {bad}", expected=want, got=tuple(sizes))
    return tuple(sorted(set(sizes)))


def text_context(cfg, context, where: str) -> torch.Tensor:
    """A text context as [B, L, text_dim] (a 2-D one gains the batch dim), or a clear error."""
    want = f"a float tensor [B, <= {cfg.text_len}, {cfg.text_dim}] (text-encoder embeddings)"
    if not isinstance(context, torch.Tensor):
        raise InputError(f"{where}: the text context must be a torch.Tensor", expected=want,
                         got=type(context).__name__, fix="torch.as_tensor(context)")
    if context.device.type == "meta":
        raise InputError(f"{where}: the text context is on the meta device (a shape without data)", expected=want,
                         got=f"{context.dtype}{list(context.shape)} on meta",
                         fix="pass the text encoder's real output; a model built on the meta device needs "
                             "its weights loaded (load_state_dict(..., assign=True) or to_empty()) before encoding")
    if not context.is_floating_point():
        raise InputError(f"{where}: the text context holds no float data", expected=want,
                         got=f"{context.dtype} on {context.device}", fix="pass the text encoder's float embeddings")
    if context.dim() == 2:
        context = context[None]
    if context.dim() != 3 or context.shape[2] != cfg.text_dim or not 1 <= context.shape[1] <= cfg.text_len \
            or context.shape[0] < 1:
        raise InputError(f"{where}: the text context has the wrong shape", expected=want, got=list(context.shape),
                         fix="one row per video: at least one" if context.dim() == 3 and context.shape[0] < 1 else None)
    return context


def finite_context(context: torch.Tensor, where: str) -> None:
    """Refuse a host context holding NaN or inf (every frame of its video would be NaN). Checked
    where the context is, before it is uploaded, so it waits for no device work. A context already
    on a device (a text encoder's output on CUDA) is not checked: reading the answer would wait for
    the chunks in flight on that device, the stall ``open()`` must not add. On the CPU the check
    runs with graphrt's host-read checker paused: it reads host memory, not a device's."""
    if context.device.type != "cpu":
        return
    finite = call_unwatched(lambda c: bool(torch.isfinite(c).all()), context)   # host-read-ok: a host tensor
    if not finite:
        def bad_rows(c):
            return (~torch.isfinite(c)).flatten(1).any(1).nonzero().flatten().tolist()   # host-read-ok: a host tensor, for the error

        rows = call_unwatched(bad_rows, context)
        raise InputError(f"{where}: the text context holds NaN or inf (row(s) {rows}): its video would be NaN",
                         expected="finite embeddings", got="non-finite values",
                         fix="check the text encoder's output (its dtype: fp16 overflows; its weights)")


def video(cfg, rolling: bool, num_chunks: int | None, seeds: list) -> None:
    """A video of ``num_chunks`` fits the static cache (any length fits a ``rolling`` one), and each
    row's seed is an int in [0, 2**63) (row i of a batched context gets seed + i)."""
    limit = None if rolling else cfg.num_chunks
    if num_chunks is not None and limit is not None and num_chunks > limit:
        raise CacheError(f"a video of {num_chunks} chunks does not fit max_frames={cfg.max_frames} "
                         f"({limit} chunks of {cfg.chunk_frames} frames)",
                         fix="build the Engine with window=(frames, sink_frames) for longer videos")
    bad = [x for x in seeds if not is_int(x) or not 0 <= x < 2 ** 63]
    if bad:
        raise InputError("seed must be an int in [0, 2**63) (row i of a batch gets seed + i)",
                         got=bad[0] if len(seeds) == 1 else bad)


def open_sessions(sessions, session_type: type, open_ones: dict, where: str) -> None:
    """Each of ``sessions`` a ``session_type`` open in ``open_ones`` (id -> session, by identity),
    each at most once."""
    seen = set()
    for s in sessions:
        if not isinstance(s, session_type) or open_ones.get(s.id) is not s:
            raise InputError(f"{where}: {s!r} is not a session open in this engine",
                             fix="pass sessions this engine's open() returned and that are not closed")
        if id(s) in seen:
            raise InputError(f"{where}: session {s.id} is listed twice", got=[x.id for x in sessions],
                             fix="list each session once: one step() makes one chunk per session")
        seen.add(id(s))


def engine_inductor(inductor, device: torch.device, backend: str = "auto"):
    """An Engine's ``inductor`` setting: ``"auto"`` is ``"once"`` on CUDA graphs (one compile for
    every bucket, inside the graphs) and ``False`` elsewhere (the CPU emulation replays the ops)."""
    if inductor != "auto":
        return inductor
    return "once" if torch.device(device).type == "cuda" and backend in ("auto", "cuda-graph") else False


def parallel_inductor(inductor, model, device: torch.device):
    """The ``inductor`` setting for a sequence-parallel model on the CPU: inductor's C++ wrappers
    (an AOTInductor package, ``cpp_wrapper``) cannot call torch's functional collectives, so
    ``True`` means the Python wrapper there and an explicit C++ wrapper is refused."""
    if getattr(model, "parallel", None) is None or torch.device(device).type != "cpu":
        return inductor
    if inductor is True:
        return "python"
    if inductor in ("aoti", "cpp-wrapper"):
        raise ConfigError(f"inductor={inductor!r} cannot run a sequence-parallel model on the CPU: inductor's C++ "
                          "wrappers do not support the functional collectives (all-to-all, all-gather)",
                          expected="inductor=True or 'python'", got=inductor, fix="pass inductor=True")
    return inductor
