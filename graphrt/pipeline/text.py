"""The Wan text encoder (transformers' umT5 encoder and its tokenizer) with a prompt cache keyed by text.

A prompt becomes the text context the DiT's cross-attention reads: the encoder's last hidden
state over the prompt's tokens (the ``</s>`` included), as Wan and diffusers' ``WanPipeline``
compute it. The padding past the tokens is zeros, added by the DiT up to its ``text_len``; so the
context returned here is ``[1, tokens, text_dim]``. A prompt seen before skips the encoder.
"""
from __future__ import annotations

import html
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from graphrt.errors import InputError


def clean_prompt(text: str) -> str:
    """The prompt as Wan cleans it before tokenizing: HTML entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@dataclass
class TextStats:
    hits: int = 0            # prompts served from the cache
    misses: int = 0          # prompts that ran the encoder


class TextEncoder:
    """umT5 encoder + tokenizer -> text context, with an LRU prompt cache keyed by the cleaned text.

    >>> text = TextEncoder(UMT5EncoderModel.from_pretrained(...), AutoTokenizer.from_pretrained(...))
    >>> ctx = text("a red fox running through snow")          # [1, tokens, 4096]

    ``max_length`` is the token budget (Wan: 512); longer prompts are truncated, as upstream.
    ``cache_size`` bounds the cache (least recently used prompts are dropped first).
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer, *, max_length: int = 512, cache_size: int = 256):
        if max_length < 1 or cache_size < 0:
            raise InputError("max_length must be >= 1 and cache_size >= 0", got=(max_length, cache_size))
        self.encoder, self.tokenizer = encoder.eval(), tokenizer
        self.max_length, self.cache_size = max_length, cache_size
        self.stats = TextStats()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def __call__(self, prompt: str) -> torch.Tensor:
        """The text context ``[1, tokens, dim]`` of ``prompt`` (cached by its cleaned text)."""
        if not isinstance(prompt, str):
            raise InputError("a prompt is a str", got=type(prompt).__name__)
        key = clean_prompt(prompt)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.stats.hits += 1
            return hit
        self.stats.misses += 1
        ctx = self._encode(key)
        if self.cache_size:
            self._cache[key] = ctx
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ctx

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        tok = self.tokenizer([text], padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        n = int(tok.attention_mask[0].sum())     # host-side: the tokenizer's output is a CPU tensor
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[:, :n]
