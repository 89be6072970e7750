"""Keys and values of the positions already seen, for generation: each new token attends to the cache
instead of re-running the whole prefix (inference only; training never passes a cache).

``KVCache(model.cfg, batch, max_len, device, dtype)`` preallocates, per layer, ``(B, G, S, d)`` key
and value buffers (S = ``max_len``, G key/value heads: the cache holds them before the grouped-query
repeat). ``model(tokens_BT, cache=cache)`` runs the T new positions starting at ``cache.pos``:
their rotary angles are those of positions ``pos .. pos+T-1``, each layer appends its keys and
values, and the model advances ``pos`` by T at the end. A prefill from position 0 attends with the
causal flag, as the uncached forward does; later steps pass an explicit mask over the S positions.

Legend: B batch, T new positions, S positions cached so far (this step's included), G key/value
heads, d head size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class LayerKV:
    """One layer's key/value buffers; its position is the cache's (all layers move together)."""

    def __init__(self, owner: "KVCache", k_BGSd: torch.Tensor, v_BGSd: torch.Tensor) -> None:
        self.owner, self.k_BGSd, self.v_BGSd = owner, k_BGSd, v_BGSd

    def append(self, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values at ``pos..pos+T-1``; return every cached position's."""
        start, T = self.owner.pos, k_BGTd.shape[2]
        end = start + T
        if end > self.k_BGSd.shape[2]:
            raise ValueError(f"KV cache full: {end} positions, room for {self.k_BGSd.shape[2]} (model.max_seq_len)")
        self.k_BGSd[:, :, start:end] = k_BGTd
        self.v_BGSd[:, :, start:end] = v_BGTd
        return self.k_BGSd[:, :, :end], self.v_BGSd[:, :, :end]

    def mask(self, T: int) -> Optional[torch.Tensor]:
        """None (use ``is_causal``) for a prefill from position 0; else a (T, S) bool mask: new position
        ``pos + i`` sees cached positions ``<= pos + i``."""
        start = self.owner.pos
        if start == 0:
            return None
        S = start + T
        device = self.k_BGSd.device
        q_T1 = torch.arange(start, S, device=device).unsqueeze(1)
        return torch.arange(S, device=device).unsqueeze(0) <= q_T1


class KVCache:
    """Every layer's keys and values of one generation; ``pos`` is the next position to fill."""

    def __init__(self, cfg: Any, batch: int, max_len: int, device: torch.device | str,  # noqa: ANN401 - ModelConfig
                 dtype: torch.dtype) -> None:
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.pos = 0
        self.max_len = max_len
        self.layers = [LayerKV(self, torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layers)]

    def advance(self, T: int) -> None:
        self.pos += T

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int = 1, max_len: Optional[int] = None) -> "KVCache":
        """A cache on the model's device and in its dtype, ``max_len`` positions (model.max_seq_len)."""
        p = next(model.parameters())
        return cls(model.cfg, batch, max_len or model.cfg.max_seq_len, p.device, p.dtype)
