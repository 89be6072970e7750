"""The seed trainer's model written from the facts of issue 22 (not from its code, and without moe_dist's
modules): a reference forward over a seed-format ``model_state_dict``, and a builder of such states.

Used by the tests of the seed options (``test_seed_model.py``) and of ``moe-ckpt import-seed``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def seed_state(d: int, n_layers: int, n_heads: int, d_ff: int, num_experts: int, vocab: int,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A seed ``model_state_dict``: every weight N(0, 0.02), norm gains around 1 (as after some training),
    ``lm_head.weight`` the embedding's own tensor."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    def gain():
        return 1.0 + 0.1 * torch.randn(d, generator=g)

    sd = {"token_embedding.weight": w(vocab, d)}
    for i in range(n_layers):
        b = f"transformer_blocks.{i}"
        sd[f"{b}.attention.qkv.weight"] = w(3 * d, d)
        sd[f"{b}.attention.w_o.weight"] = w(d, d)
        for e in range(num_experts):
            sd[f"{b}.feed_forward.experts.{e}.linear1.weight"] = w(d_ff, d)
            sd[f"{b}.feed_forward.experts.{e}.linear2.weight"] = w(d, d_ff)
        sd[f"{b}.feed_forward.router.gate.weight"] = w(num_experts, d)
        sd[f"{b}.norm1.weight"], sd[f"{b}.norm2.weight"] = gain(), gain()
    sd["norm.weight"] = gain()
    sd["lm_head.weight"] = sd["token_embedding.weight"]
    return sd


def _rope_interleaved(x_BTHd: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """torchtune's RotaryPositionalEmbeddings: pairs (2i, 2i+1), tables in fp32."""
    B, T, H, hd = x_BTHd.shape
    theta = 1.0 / (base ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    ang = torch.einsum("i,j->ij", torch.arange(T, dtype=torch.float32), theta)  # (T, hd/2)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    xs = x_BTHd.float().reshape(B, T, H, hd // 2, 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(3).type_as(x_BTHd)


def seed_forward(sd: dict[str, torch.Tensor], n_heads: int, top_k: int, tokens_BT: torch.Tensor,
                 with_aux: bool = False):
    """Eval-mode logits of the seed model (no dropout, no router noise); with ``with_aux`` also the
    training aux loss ``0.01 * E * sum_e f_e P_e`` summed over layers (f over the T*K assignments)."""
    eps = torch.finfo(torch.float32).eps
    emb = sd["token_embedding.weight"]
    d = emb.shape[1]
    hd = d // n_heads
    x = F.embedding(tokens_BT, emb) * math.sqrt(d)
    B, T, _ = x.shape
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    aux = torch.zeros(())
    for i in range(n_layers):
        b = f"transformer_blocks.{i}"
        h = F.rms_norm(x, (d,), sd[f"{b}.norm1.weight"], eps)
        q, k, v = (h @ sd[f"{b}.attention.qkv.weight"].T).reshape(B, T, 3, n_heads, hd).unbind(2)
        q, k = _rope_interleaved(q), _rope_interleaved(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + o.transpose(1, 2).reshape(B, T, d) @ sd[f"{b}.attention.w_o.weight"].T
        h = F.rms_norm(x, (d,), sd[f"{b}.norm2.weight"], eps).reshape(B * T, d)
        gate = sd[f"{b}.feed_forward.router.gate.weight"]
        E = gate.shape[0]
        logits = h @ gate.T
        top_logits, top_idx = logits.topk(top_k, dim=-1)
        top_w = top_logits.softmax(-1)
        y = torch.zeros_like(h)
        for e in range(E):
            w1 = sd[f"{b}.feed_forward.experts.{e}.linear1.weight"]
            w2 = sd[f"{b}.feed_forward.experts.{e}.linear2.weight"]
            ye = F.silu(h @ w1.T) @ w2.T
            y = y + (top_w * (top_idx == e)).sum(-1, keepdim=True) * ye
        x = x + y.reshape(B, T, d)
        probs = logits.softmax(-1)
        frac = torch.stack([(top_idx == e).sum() for e in range(E)]).float() / (B * T * top_k)
        aux = aux + 0.01 * E * (frac * probs.mean(0)).sum()
    x = F.rms_norm(x, (d,), sd["norm.weight"], eps)
    logits = x @ sd["lm_head.weight"].T
    return (logits, aux) if with_aux else logits


def seed_newton_schulz(g_RC: torch.Tensor, dtype: torch.dtype = torch.float32, steps: int = 5) -> torch.Tensor:
    """The seed's Muon orthogonalisation: the standard quintic Newton-Schulz (3.4445, -4.7750, 2.0315) on the
    Frobenius-normalised matrix (its wide orientation), computed in ``dtype`` and returned in it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g_RC.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x
