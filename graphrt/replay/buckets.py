"""Bucket keys: which captured graph serves a request, and the one rule that maps it there.

A request is the bound call ``fn(*args, **kwargs)`` flattened with ``torch.utils._pytree``.
Its leaves are tensors (copied into static buffers), runtime-state objects such as a KV cache
(matched by identity) and plain Python values (frozen into the graph, so part of the key).

Without a spec every distinct signature (shapes, dtypes, devices, Python values) is its own
bucket. With ``Buckets(batch_sizes=..., batch_args=..., static_args=...)`` the batch is padded
up to the next batch size, and the named static arguments (for example ``kv_frames``) must take
one of the listed values; the key is then (batch bucket, static values, the rest of the
signature with the batch dimension left out).
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from graphrt.capture.state import is_runtime_state
from graphrt.capture.tensors import SCALARS
from graphrt.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    batched: bool = False  # dim 0 is the batch bucket

    @classmethod
    def of(cls, t: torch.Tensor, batch: int | None = None) -> "TensorSpec":
        if batch is None:
            return cls(tuple(t.shape), t.dtype, t.device)
        return cls((batch,) + tuple(t.shape[1:]), t.dtype, t.device, True)

    def with_batch(self, batch: int) -> "TensorSpec":
        return TensorSpec((batch,) + self.shape[1:], self.dtype, self.device, True) if self.batched else self

    def __str__(self):
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)} on {self.device}"


@dataclass(frozen=True)
class StateRef:
    """A runtime-state leaf (a KV cache, ...), matched by identity."""

    kind: str
    ident: int

    def __str__(self):
        return f"<{self.kind} at {self.ident:#x}>"


@dataclass(frozen=True)
class PyValue:
    """A Python value frozen into a graph, keyed with its type (so 2, 2.0 and True differ, and
    floats by their exact bits, so -0.0 and 0.0 differ)."""

    type: str
    key: Any
    value: Any = field(compare=False, hash=False)

    @classmethod
    def of(cls, x) -> "PyValue":
        return cls(type(x).__qualname__, x.hex() if isinstance(x, float) else x, x)

    @classmethod
    def identity(cls, x) -> "PyValue":
        """An object keyed by identity (a ``@dataclass`` holding state, unhashable since it defines
        ``__eq__``): the graph uses its tensors live, as it does a cache's. The key holds the object,
        so its id cannot be reused while the graph exists."""
        return cls(type(x).__qualname__, _Identity(id(x)), x)

    @property
    def by_identity(self) -> bool:
        """Whether two values match only when they are the same object."""
        return isinstance(self.key, _Identity) or (
            not isinstance(self.value, SCALARS) and type(self.value).__eq__ is object.__eq__)

    def __str__(self):
        if isinstance(self.key, _Identity):     # its repr would print every tensor it holds
            return f"<{self.type} at {id(self.value):#x}>"
        return repr(self.value)


@dataclass(frozen=True)
class _Identity:
    ident: int


@dataclass(frozen=True)
class BucketKey:
    """Frozen, hashable name of one captured graph."""

    batch: int | None
    statics: tuple[tuple[str, PyValue], ...]
    signature: tuple[tuple[str, Any], ...] = field(repr=False)
    structure: Any = field(default=None, repr=False)   # the call's TreeSpec: a list is not a tuple

    def __str__(self):
        parts = [] if self.batch is None else [f"batch={self.batch}"]
        parts += [f"{k}={v}" for k, v in self.statics]
        if self.batch is None and not self.statics:
            parts += [f"{p}={v}" for p, v in self.signature]
        return " ".join(parts) or "<no arguments>"

    def sort_key(self):
        """Larger buckets first: batch, then the numeric static values (``batch``, ``kv_frames``,
        ...) in their order; flags (bools such as ``kv_exact``) only break ties."""
        nums = tuple(v.value for _, v in self.statics
                     if isinstance(v.value, (int, float)) and not isinstance(v.value, bool))
        flags = tuple(v.value for _, v in self.statics if isinstance(v.value, bool))
        return (self.batch or 0,) + nums + flags


@dataclass
class Request:
    """One call, bound to the function's signature and flattened."""

    paths: list[str]
    leaves: list[Any]
    spec: pytree.TreeSpec
    names: list[str]            # the parameter each leaf belongs to
    batch: int | None = None    # rows in the request (before padding)

    def rebuild(self, leaves) -> tuple[tuple, dict]:
        args, kwargs = pytree.tree_unflatten(list(leaves), self.spec)
        return args, kwargs

    def tensors(self):
        return [(i, x) for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]


def parameter_names(signature: inspect.Signature | None) -> set[str] | None:
    """Names a bucket spec may refer to, or None when any name may come (``**kwargs``, no signature)."""
    if signature is None or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return set(signature.parameters)


def bind(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> Request:
    """Bind a call to ``signature`` (defaults applied, so defaults are part of the key) and flatten it.

    Positional arguments stay positional (``f(a, *rest)`` works); keyword arguments are sorted,
    so the caller's keyword order never changes the key.
    """
    positional: list[str] = []
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"arguments do not fit the function: {e}") from None
        bound.apply_defaults()
        args, kwargs = bound.args, dict(sorted(bound.kwargs.items()))
        params = signature.parameters.values()
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_pos = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), "args")
    flat, spec = pytree.tree_flatten_with_path((args, kwargs))
    paths, names = [], []
    for p, _ in flat:
        head, rest = p[1], pytree.keystr(p[2:])
        if isinstance(head, pytree.MappingKey):
            name, path = head.key, f"{head.key}{rest}"
        elif head.idx < len(positional):
            name, path = positional[head.idx], f"{positional[head.idx]}{rest}"
        else:
            name = var_pos if signature is not None else f"arg{head.idx}"
            path = f"{var_pos}[{head.idx - len(positional)}]{rest}" if signature is not None else f"{name}{rest}"
        paths.append(path)
        names.append(name)
    return Request(paths, [x for _, x in flat], spec, names)


def _batch_sizes(sizes) -> tuple[int, ...] | None:
    """Batch buckets as sorted distinct ints >= 1, or None (no padding)."""
    if sizes is None:
        return None
    want = "a non-empty sequence of ints >= 1, e.g. (1, 2, 4), or None"
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise InputError("batch_sizes must be a sequence of ints", expected=want, got=repr(sizes))
    sizes = tuple(sizes)
    bad = [b for b in sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if not sizes or bad:
        raise InputError(f"batch sizes must be ints >= 1{f'; got {bad}' if bad else ''}", expected=want, got=sizes,
                         fix="list the batch buckets to capture, e.g. Buckets((1, 2, 4), batch_args=('x',))")
    return tuple(sorted(set(sizes)))


def _names(what: str, names) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Iterable) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{what} must be a sequence of argument names", expected="e.g. ('x', 't')", got=repr(names),
                         fix=f"{what}=('{names}',)" if isinstance(names, str) else None)
    return tuple(names)


def _leaf_key(x, path: str):
    if is_runtime_state(x):
        return StateRef(type(x).__name__, id(x))
    try:
        hash(x)
    except TypeError:
        if hasattr(x, "__dict__"):       # an object holding state (an eq=True dataclass): keyed by identity
            return PyValue.identity(x)
        raise InputError(f"argument {path} of type {type(x).__name__} is neither a tensor, a hashable value "
                         "nor an object", fix="pass tensors, Python scalars, objects (a cache, a dataclass), "
                         "or tuples/lists/dicts of them") from None
    return PyValue.of(x)


class Buckets:
    """Which graphs may exist and the rule that maps a request to one.

    - ``batch_sizes``: batch buckets; a request of B rows runs in the smallest bucket >= B, its
      padded rows zero-filled and pointed at the cache's scratch slab. None: no padding, the
      batch is part of the signature.
    - ``batch_args``: names of the arguments batched on dim 0 (latents, timestep, context, ...).
    - ``static_args``: argument name -> the values it may take; each combination with each batch
      size is one bucket (``prewarm`` captures them all). Other Python values are keyed as-is.
    """

    def __init__(self, batch_sizes: Sequence[int] | None = None, *, batch_args: Sequence[str] = (),
                 static_args: Mapping[str, Sequence[Any]] | None = None):
        self.batch_sizes = _batch_sizes(batch_sizes)
        if self.batch_sizes and not batch_args:
            raise InputError("batch_sizes needs batch_args: the names of the arguments batched on dim 0")
        self.batch_args = _names("batch_args", batch_args)
        if static_args is not None and not isinstance(static_args, Mapping):
            raise InputError("static_args must map an argument name to the values it may take",
                             expected='a dict, e.g. {"kv_frames": (3, 6, 9)}', got=type(static_args).__name__)
        self.static_args = {}
        for k, v in (static_args or {}).items():
            if not isinstance(k, str) or isinstance(v, (str, bytes)) or not isinstance(v, Iterable) or not tuple(v):
                raise InputError(f"static_args[{k!r}] must be a non-empty sequence of the values it may take",
                                 expected='e.g. {"kv_frames": (3, 6, 9)}', got=v)
            self.static_args[k] = tuple(v)

    def __repr__(self):
        return f"Buckets(batch_sizes={self.batch_sizes}, batch_args={self.batch_args}, static_args={self.static_args})"

    def _batched(self, req: Request, i: int) -> bool:
        return self.batch_sizes is not None and req.names[i] in self.batch_args

    def request_batch(self, req: Request) -> int | None:
        if self.batch_sizes is None:
            return None
        sizes = {x.shape[0] for i, x in req.tensors() if self._batched(req, i)}
        if len(sizes) > 1:
            raise InputError("batched arguments disagree on the batch size", expected="one size on dim 0",
                             got={req.paths[i]: x.shape[0] for i, x in req.tensors() if self._batched(req, i)})
        if not sizes:
            raise InputError("none of the batch_args was passed as a tensor", expected=self.batch_args)
        return sizes.pop()

    def key(self, req: Request) -> BucketKey:
        """The bucket a request maps to (which may or may not exist)."""
        req.batch = b = self.request_batch(req)
        bucket = None if b is None else next((s for s in self.batch_sizes if s >= b), b)
        statics, sig = [], []
        for i, (path, x) in enumerate(zip(req.paths, req.leaves)):
            if isinstance(x, torch.Tensor):
                sig.append((path, TensorSpec.of(x, bucket if self._batched(req, i) else None)))
            elif req.names[i] in self.static_args:
                if path != req.names[i]:
                    raise InputError(f"static argument {req.names[i]!r} must be a single Python value",
                                     got=f"a container ({path})", fix="pass a scalar, or leave it out of static_args")
                statics.append((path, _leaf_key(x, path)))
            else:
                sig.append((path, _leaf_key(x, path)))
        return BucketKey(bucket, tuple(statics), tuple(sig), req.spec)

    def allows(self, key: BucketKey) -> str | None:
        """Why the spec has no such bucket, or None when it does."""
        if self.batch_sizes is not None and key.batch not in self.batch_sizes:
            return f"batch {key.batch} is larger than the largest batch bucket {self.batch_sizes[-1]}"
        for name, value in key.statics:
            allowed = self.static_args.get(name)
            if allowed is not None and value not in [PyValue.of(a) for a in allowed]:
                return f"{name}={value} is not one of {allowed}"
        return None

    def check_names(self, names: set[str] | None) -> None:
        """Refuse a spec that names arguments the function does not have (a typo would never match)."""
        if names is None:
            return
        unknown = sorted((set(self.batch_args) | set(self.static_args)) - names)
        if unknown:
            raise InputError(f"the bucket spec names argument(s) the function does not have: {unknown}",
                             expected=sorted(names), fix="spell batch_args / static_args as the function's parameters")

    def expand(self, key: BucketKey) -> list[BucketKey]:
        """Every bucket of the spec that shares ``key``'s signature (what ``prewarm`` captures)."""
        names = [n for n, _ in key.statics]
        choices = [[PyValue.of(a) for a in self.static_args[n]] if n in self.static_args else [v]
                   for n, v in key.statics]
        batches = self.batch_sizes or (key.batch,)
        out = []
        for b, combo in itertools.product(batches, itertools.product(*choices)):
            sig = tuple((p, v.with_batch(b) if isinstance(v, TensorSpec) else v) for p, v in key.signature)
            out.append(BucketKey(b, tuple(zip(names, combo)), sig, key.structure))
        return sorted(set(out), key=BucketKey.sort_key, reverse=True)
