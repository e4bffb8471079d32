"""Greedy decoding of a transformers causal LM: eager prefill, then one graph per batch bucket.

The loop a user would otherwise write, with the graph-specific parts done once:

- one ``StaticCache`` allocated at the largest batch bucket; each bucket (and the prefill) uses a
  view of its first rows (:func:`graphrt.llm.cache.batch_view`), so memory is one cache;
- the prefill runs eagerly (its length varies); every decode step is one replay of the bucket's
  graph: forward, argmax, stop-token bookkeeping, all on the device;
- a request of B rows runs in the smallest bucket >= B; padded rows read and write only their own
  cache rows, so they disturb no real row;
- stop tokens: a finished row keeps emitting ``pad_token_id`` (decided on the device); the loop
  reads one flag every ``check_every`` tokens to stop early, so host reads per token are
  ``1 / check_every`` (none without stop tokens).

``generate`` is the whole loop; ``start`` (prefill, first token) and ``step`` (one replay) are its
parts, for a loop of your own.

Positions never leave the device: transformers' static layers keep ``cumulative_length`` as a
device tensor that the graph advances in place. The host counts tokens itself, so a request that
would run past the cache is refused before any step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from graphrt.errors import CacheError, InputError
from graphrt.llm.cache import batch_view, check_layout
from graphrt.replay import Buckets, compile as graphrt_compile

MODES = ("eager", "graphs")


@dataclass
class DecodeStats:
    """What the last :meth:`LLMDecoder.generate` did."""

    batch: int = 0
    bucket: int | None = None        # the graph's batch (None in eager mode)
    prompt_tokens: int = 0
    new_tokens: int = 0              # tokens per row generated (stops early when every row has stopped)
    host_reads: int = 0              # reads the loop made (stop checks); the replays make none
    prefill_s: float = 0.0           # host wall time (no device sync)
    decode_s: float = 0.0


def _new_cache(model, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


class LLMDecoder:
    """Greedy decoding with one captured graph per batch bucket.

    ``model`` is a transformers causal LM that accepts ``past_key_values`` (a ``StaticCache``);
    ``max_cache_len`` bounds prompt + new tokens. ``mode="eager"`` runs the same loop without
    graphs (the control). ``backend``, ``inductor`` and ``verify`` go to :func:`graphrt.compile`.

    >>> dec = LLMDecoder(model, max_cache_len=256, batch_sizes=(1, 2, 4), stop_tokens=[eos]).prewarm()
    >>> tokens = dec.generate(input_ids, max_new_tokens=64)      # [B, <=64] on the model's device
    """

    def __init__(self, model: torch.nn.Module, *, max_cache_len: int, batch_sizes: Sequence[int] = (1,),
                 stop_tokens: Sequence[int] = (), pad_token_id: int | None = None, check_every: int = 8,
                 mode: str = "graphs", backend: str = "auto", inductor: bool = False, verify: int = 0,
                 progress: bool = True):
        if mode not in MODES:
            raise InputError(f"unknown decode mode {mode!r}", expected=MODES, got=mode)
        if check_every < 1:
            raise InputError("check_every must be at least 1 (tokens between two stop checks)", got=check_every)
        if not batch_sizes or min(batch_sizes) < 1:
            raise InputError("batch_sizes must be positive batch sizes", got=batch_sizes)
        if max_cache_len < 2:
            raise InputError("max_cache_len must hold a prompt token and a new one", expected=">= 2", got=max_cache_len)
        p = next(model.parameters())
        self.model, self.device, self.mode = model, p.device, mode
        self.max_cache_len, self.check_every = max_cache_len, check_every
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.max_batch = self.batch_sizes[-1]
        self.cache = _new_cache(model, max_cache_len)
        check_layout(self.cache)
        with torch.no_grad():                        # allocate every layer at the largest bucket
            model(input_ids=torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device),
                  past_key_values=self.cache, use_cache=True)
        self.cache.reset()
        self._views = {self.max_batch: self.cache}
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None)
        self.pad = 0 if pad_token_id is None else int(pad_token_id)     # a constant: frozen into the graph
        self.stop = torch.tensor(list(stop_tokens) or [-1], dtype=torch.long, device=self.device)
        self.has_stop = bool(stop_tokens)
        self.done = torch.zeros(self.max_batch, dtype=torch.bool, device=self.device)
        self.stats = DecodeStats()
        self._budget = 0
        self.graphs = None
        if mode == "graphs":
            self.graphs = graphrt_compile(self._step, buckets=Buckets(self.batch_sizes, batch_args=("tokens",)),
                                          backend=backend, inductor=inductor, verify=verify, progress=progress)

    def view(self, rows: int):
        """The cache seen as ``rows`` rows (made once per size)."""
        if rows not in self._views:
            self._views[rows] = batch_view(self.cache, rows)
        return self._views[rows]

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for ``tokens`` [b, 1]: the next token per row; rows past a stop token get pad."""
        b = tokens.shape[0]
        logits = self.model(input_ids=tokens, past_key_values=self.view(b), use_cache=True).logits[:, -1]
        done = self.done[:b]
        nxt = torch.where(done, self.pad, logits.argmax(-1))
        done.logical_or_(torch.isin(nxt, self.stop))
        return nxt

    def prewarm(self) -> "LLMDecoder":
        """Capture every batch bucket now (largest first) and seal the set of graphs."""
        if self.graphs is not None:
            self.cache.reset()
            with torch.no_grad():
                self.graphs.prewarm(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        return self

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, max_new_tokens: int = 1) -> torch.Tensor:
        """Reset the cache and prefill ``input_ids`` [B, T] eagerly (one prompt length per batch);
        returns the first new token per row [B]. Refuses a request that would run past the cache."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise InputError("input_ids must be an int64 tensor [batch, prompt_len]",
                             got=getattr(input_ids, "shape", type(input_ids).__name__))
        batch, prompt = input_ids.shape
        if not 0 < batch <= self.max_batch:
            raise InputError(f"batch {batch} does not fit the batch buckets {self.batch_sizes}",
                             expected=f"1..{self.max_batch} rows", got=batch,
                             fix="add a larger batch size to batch_sizes, or split the batch")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1", got=max_new_tokens)
        last = prompt + max_new_tokens - 1            # the step for the last new token writes at last - 1
        if prompt < 1 or last > self.max_cache_len:
            raise CacheError(f"the request runs past the cache: prompt {prompt} + {max_new_tokens} new tokens needs "
                             f"{last} positions", expected=f"<= max_cache_len = {self.max_cache_len}", got=last,
                             fix="build the LLMDecoder with a larger max_cache_len, or ask for fewer tokens")
        bucket = None if self.graphs is None else next(b for b in self.batch_sizes if b >= batch)
        self.stats = DecodeStats(batch=batch, bucket=bucket, prompt_tokens=prompt)
        self._budget = max_new_tokens - 1
        self.cache.reset()
        self.done.zero_()
        logits = self.model(input_ids=input_ids.to(self.device), past_key_values=self.view(batch), use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        tok = logits.argmax(-1)
        self.done[:batch].logical_or_(torch.isin(tok, self.stop))
        self.stats.new_tokens = 1
        return tok

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """One decode step after :meth:`start`: the next token per row [B] (a static output in graph
        mode: valid until the next step). Refuses a step past the tokens :meth:`start` allowed for."""
        if self._budget < 1:
            raise CacheError("a step past the request: the tokens start() was told of are all generated",
                             expected=f"at most {self.stats.new_tokens - 1} steps after start()",
                             fix="call start(input_ids, max_new_tokens) with the number of tokens you will step")
        self._budget -= 1
        self.stats.new_tokens += 1
        return (self._step if self.graphs is None else self.graphs)(tok[:, None])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens after ``input_ids`` [B, T] (one prompt length per batch): [B, n] with
        ``n <= max_new_tokens`` (fewer when every row met a stop token); a finished row is padded."""
        t0 = time.perf_counter()
        tok = self.start(input_ids, max_new_tokens)
        out = torch.empty(tok.shape[0], max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = tok
        t1 = time.perf_counter()
        n = 1
        while n < max_new_tokens:
            if self.has_stop and n % self.check_every == 0:
                self.stats.host_reads += 1
                if bool(self.done[:tok.shape[0]].all()):   # host-read-ok: one stop check per check_every tokens
                    break
            tok = self.step(tok)
            out[:, n] = tok
            n += 1
        self.stats.prefill_s, self.stats.decode_s = t1 - t0, time.perf_counter() - t1
        return out[:, :n]


@torch.no_grad()
def greedy_eager(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                 max_cache_len: int | None = None, return_logits: bool = False):
    """The plain eager loop (a fresh ``StaticCache`` at the batch's size, no graphrt): the reference
    a graph decode must equal. Returns tokens [B, max_new_tokens] (and each step's logits).

    Pass the LLMDecoder's ``max_cache_len`` for a bit-exact reference: attention reads the whole static
    length, and another length sums in another order (bf16 greedy tokens can then diverge)."""
    batch, prompt = input_ids.shape
    cache = _new_cache(model, max_cache_len or prompt + max_new_tokens)
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tokens, steps = [logits.argmax(-1)], [logits]
    for _ in range(max_new_tokens - 1):
        logits = model(input_ids=tokens[-1][:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        tokens.append(logits.argmax(-1))
        steps.append(logits)
    out = torch.stack(tokens, dim=1)
    return (out, torch.stack(steps, dim=1)) if return_logits else out
