"""Sampling tokens from a model: greedy, temperature and top-k, with a KV cache.

With the cache (the default) the prompt is run once (the prefill) and each new token is one
position attending to the cached keys and values, so a token costs the same at any length instead
of growing with the prefix. Past ``model.max_seq_len`` the model only sees the last ``max_seq_len``
tokens, as without the cache; there each token re-runs that window (rotary positions are absolute,
so a cache cannot slide), which is what every token costs uncached. ``use_cache=False`` is the
plain re-run of the whole window per token, kept as the reference the cache is tested against.

``on_token(id)`` is called as each token is chosen (``moe-generate`` streams the text with it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..model.kv_cache import KVCache


@dataclass
class GenerationTimes:
    """Wall-clock seconds of one ``generate``: to the first token (prefill included) and in total."""

    first_token_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    per_token_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second after the first (the steady decoding rate)."""
        rest = self.total_s - self.first_token_s
        return (self.tokens - 1) / rest if self.tokens > 1 and rest > 0 else 0.0


def _pick(logits_V: torch.Tensor, temperature: float, top_k: Optional[int],
          generator: Optional[torch.Generator]) -> int:
    if temperature <= 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V[logits_V < kth] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: Optional[int] = 50, generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
             vocab_limit: Optional[int] = None, min_new_tokens: int = 0, ignore_eos: bool = False,
             use_cache: bool = True, on_token: Optional[Callable[[int], None]] = None,
             times: Optional[GenerationTimes] = None) -> list[int]:
    """Sample up to ``max_new_tokens`` ids after ``prompt``. ``eos_id`` ends it, except within the first
    ``min_new_tokens`` (EOS cannot be drawn there) or with ``ignore_eos`` (EOS is kept as a token and
    sampling goes on). ``temperature`` 0 is greedy; ``vocab_limit`` masks ids the tokenizer cannot
    decode. Sampling draws on the CPU from ``generator``, so a seed gives the same text on any device."""
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    ids = list(prompt)
    out: list[int] = []
    cache: Optional[KVCache] = None
    start = time.perf_counter()
    for step in range(max_new_tokens):
        if use_cache and cache is not None and cache.pos < max_len:
            logits_BTV, _ = model(torch.tensor([ids[-1:]], device=device), return_aux_loss=False, cache=cache)
        else:  # the first step, no cache, or a full cache: run the last max_len tokens from position 0
            window = torch.tensor([ids[-max_len:]], dtype=torch.long, device=device)
            cache = KVCache.for_model(model, 1, max_len) if use_cache else None
            logits_BTV, _ = model(window, return_aux_loss=False, cache=cache)
        logits_V = logits_BTV[0, -1].float().cpu()
        if vocab_limit is not None:
            logits_V[vocab_limit:] = float("-inf")
        if eos_id is not None and step < min_new_tokens:
            logits_V[eos_id] = float("-inf")
        nxt = _pick(logits_V, temperature, top_k, generator)
        if times is not None:
            now = time.perf_counter() - start
            if step == 0:
                times.first_token_s = now
            times.per_token_s.append(now)
        if nxt == eos_id and not ignore_eos:
            break
        out.append(nxt)
        ids.append(nxt)
        if on_token is not None:
            on_token(nxt)
    if times is not None:
        times.total_s, times.tokens = time.perf_counter() - start, len(out)
    return out
