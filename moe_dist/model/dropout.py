"""Dropout inside the experts whose mask depends on the token, not on where the expert runs.

The model's other dropouts (embedding, attention probabilities, residual branches, before the head)
draw from torch's generator on the token's own rank, which the trainer seeds per micro-batch: the
same sequences get the same masks on any world size, and activation checkpointing replays them.
An expert's hidden units are computed where the expert lives, on another rank under expert
parallelism, in an order that depends on every rank's routing; a draw there would differ with the
EP degree. So each (token, expert) assignment carries a 63-bit key, made on the token's side from
one draw of the token's generator, its index in the micro-batch and the expert id; the expert-side
mask of its hidden unit ``f`` is a counter hash (SplitMix64's finaliser) of (key, f). Keys travel
with the tokens through the all-to-all (8 bytes a row).

Legend: A assignments (rows), F d_ff.
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_KEY_MASK = (1 << 63) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed value int64 arithmetic wraps to."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` sign-extends)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's step on an int64 tensor: a bijective, well-mixed hash (wrapping arithmetic)."""
    z = z + _i64(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _i64(_MUL1)
    z = (z ^ _shr(z, 27)) * _i64(_MUL2)
    return z ^ _shr(z, 31)


def draw_base(device: torch.device) -> torch.Tensor:
    """One draw from torch's generator on ``device`` (a long 0-dim tensor, no host sync): the layer's
    dropout base for this forward."""
    return torch.randint(0, _KEY_MASK, (), dtype=torch.long, device=device)


def assignment_keys(base: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor,
                    num_experts: int) -> torch.Tensor:
    """The key of each (token, expert) assignment: a hash of the base and ``token * E + expert``
    (top-k experts of a token are distinct, so each assignment has its own)."""
    return mix64(base ^ mix64(token_A * num_experts + expert_A)) & _KEY_MASK


def expert_dropout(h_AF: torch.Tensor, key_A: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``h_AF`` (rate ``p``) whose row ``a`` mask is a function of ``key_A[a]`` alone."""
    f_F = torch.arange(h_AF.shape[-1], dtype=torch.long, device=h_AF.device)
    z_AF = mix64(key_A.unsqueeze(1) ^ mix64(f_F).unsqueeze(0))
    u_AF = _shr(z_AF, 40).to(torch.float32) * (1.0 / (1 << 24))  # top 24 bits: uniform in [0, 1)
    keep_AF = u_AF >= p
    return h_AF * keep_AF.to(h_AF.dtype) * (1.0 / (1.0 - p))
