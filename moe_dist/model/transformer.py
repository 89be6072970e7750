"""Decoder-only transformer whose every feed-forward is a mixture of experts.

Pre-norm blocks: ``x + attn(norm(x))`` then ``x + moe(norm(x))``; RMSNorm, rotary positions,
grouped-query attention through ``scaled_dot_product_attention``. The seed trainer's options
(``config.SEED_MODEL_OPTIONS``): an embedding scale sqrt(D), dropout, one fused ``wqkv``, interleaved
rotary pairs, the layers' aux losses summed. No process groups here:
parallelism (ZeRO, expert parallelism) is applied to a built model from ``moe_dist.parallel``.

Legend: B batch, T sequence, D d_model, H query heads, G key/value heads, d head size,
h half the head size (rotary pairs), V vocabulary.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .experts import per_expert_fill
from .kv_cache import KVCache, LayerKV
from .moe import MoEFeedForward


def param_seed(init_seed: int, name: str) -> int:
    """The seed of one parameter's initial values: stable across processes, runs and Python versions."""
    digest = hashlib.sha256(f"{init_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain; statistics in fp32 so bf16 activations stay stable."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(max_seq_len: int, head_dim: int, theta: float,
                layout: str = "half") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_seq_len, h) on the CPU, stored fp32. 'half': computed in fp64 so long positions
    stay exact; 'interleaved': computed in fp32 as torchtune's RotaryPositionalEmbeddings (the seed's) does."""
    dt = torch.float64 if layout == "half" else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].to(dt) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=dt, device="cpu"), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHTd: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor,
               layout: str = "half") -> torch.Tensor:
    """Rotate pairs of each head, computed in fp32: 'half' pairs (i, i + h) (rotate_half), 'interleaved'
    pairs (2i, 2i + 1)."""
    if layout == "interleaved":
        x_BHTh2 = x_BHTd.float().unflatten(-1, (-1, 2))
        x1, x2 = x_BHTh2[..., 0], x_BHTh2[..., 1]
        out = torch.stack((x1 * cos_Th - x2 * sin_Th, x2 * cos_Th + x1 * sin_Th), dim=-1).flatten(-2)
        return out.to(x_BHTd.dtype)
    x1, x2 = x_BHTd.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_Th - x2 * sin_Th, x1 * sin_Th + x2 * cos_Th), dim=-1)
    return out.to(x_BHTd.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions and grouped-query key/value heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rope_layout, self.dropout = cfg.rope_layout, cfg.dropout
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if cfg.fused_qkv:  # one matrix, rows [Q | K | V], each head's rows contiguous
            self.wqkv = nn.Linear(cfg.d_model, q_out + 2 * kv_out, bias=False)
        else:
            self.wq = nn.Linear(cfg.d_model, q_out, bias=False)
            self.wk = nn.Linear(cfg.d_model, kv_out, bias=False)
            self.wv = nn.Linear(cfg.d_model, kv_out, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_qkv(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H*d), k and v (B, T, G*d), from one fused matrix or three."""
        if hasattr(self, "wqkv"):
            q_out = self.n_heads * self.head_dim
            return self.wqkv(x_BTD).split([q_out, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        return self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)

    def forward(self, x_BTD: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor,
                cache: Optional[LayerKV] = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTx, k_BTx, v_BTx = self.project_qkv(x_BTD)
        q_BHTd = q_BTx.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = k_BTx.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = v_BTx.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q_BHTd = apply_rope(q_BHTd, cos_Th, sin_Th, self.rope_layout)
        k_BGTd = apply_rope(k_BGTd, cos_Th, sin_Th, self.rope_layout)
        mask = None
        if cache is not None:  # generation: attend to every cached position (k/v become (B, G, S, d))
            mask = cache.mask(T)
            k_BGTd, v_BGTd = cache.append(k_BGTd, v_BGTd)
        if self.kv_heads != self.n_heads:  # GQA: each k/v head serves n_heads / kv_heads query heads
            rep = self.n_heads // self.kv_heads
            k_BGTd, v_BGTd = k_BGTd.repeat_interleave(rep, dim=1), v_BGTd.repeat_interleave(rep, dim=1)
        o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, attn_mask=mask, is_causal=mask is None,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.wo(o_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block; returns the new residual stream and the layer's aux loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg)
        self.dropout = cfg.dropout  # on both residual branches, in training

    def forward(self, x_BTD: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor,
                cache: Optional[LayerKV] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_BTD = x_BTD + F.dropout(self.attn(self.attn_norm(x_BTD), cos_Th, sin_Th, cache), self.dropout,
                                  self.training)
        y_BTD, aux = self.ffn(self.ffn_norm(x_BTD))
        return x_BTD + F.dropout(y_BTD, self.dropout, self.training), aux


class MoETransformer(nn.Module):
    """The LM: ``forward(tokens_BT, return_aux_loss=True) -> (logits_BTV, aux_loss | None)``.

    ``aux_loss`` is ``load_balancing_weight *`` the mean over layers of the Switch loss (their sum with
    ``aux_loss_reduction='sum'``), ready to be added to the cross-entropy. Set
    ``gradient_checkpointing = True`` to recompute each block in backward (non-reentrant checkpoint;
    it restores the RNG state, so router noise, routing and dropout masks are identical in the
    recompute).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # One draw from torch's current RNG, before any submodule draws its own default init (which a
        # meta build skips), seeds every parameter's own generator (init_parameter).
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.gradient_checkpointing = False
        # Uninitialised (reset_parameters draws it): Embedding's own normal_ init would, on the meta
        # device, import torch's Python decompositions (+75 MB of RSS per process, measured). No device
        # named on purpose: the weight is made where every other parameter is (model.build's device).
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Rotary tables per device, made on first use: a plain dict, not buffers, so that casts of the
        # whole module (``.to(torch.bfloat16)``, an engine's bf16 set-up) leave them fp32.
        self._rope_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter with :meth:`init_parameter` (a no-op on the meta device)."""
        for name, p in self.named_parameters():  # deduplicated: a tied weight is drawn once
            if not p.is_meta:
                self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        """Write the initial value of parameter ``name`` into ``t`` (its full shape, any device/dtype).

        normal(0, init_std) for matrices, ones for norm gains; the projections that write into the
        residual stream (``wo``, ``w_down``) get std / sqrt(2 * n_layers) so the stream's variance does
        not grow with depth (GPT-2). Each matrix is drawn on the CPU in fp32 from a generator seeded by
        ``init_seed`` and its name alone, so a parameter's value does not depend on which others a
        process builds: a rank that builds only its experts, or one parameter at a time, gets the
        same bits as a full build. A stacked expert matrix is drawn row by row, each expert under
        its own name (``experts.<e>.w_up.weight``), so its values are those of a per-expert model."""
        per_expert_fill(self, self._init_one)(name, t)

    def _init_one(self, name: str, t: torch.Tensor) -> None:
        if t.ndim == 1:
            t.fill_(1.0)
            return
        std = self.cfg.init_std
        if self.cfg.scaled_residual_init and name.endswith(("wo.weight", "w_down.weight")):
            std = std / math.sqrt(2 * self.cfg.n_layers)
        g = torch.Generator(device="cpu").manual_seed(param_seed(self.init_seed, name))
        if t.device.type == "cpu" and t.dtype == torch.float32:
            t.normal_(0.0, std, generator=g)
        else:
            t.copy_(torch.empty(t.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=g))

    def moe_layers(self) -> Iterator[MoEFeedForward]:
        for m in self.modules():
            if isinstance(m, MoEFeedForward):
                yield m

    def rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin tables (T, h) on ``device``; computed on the CPU once, then copied there."""
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        tables = self._rope_cache.get(device)
        if tables is None:
            cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_layout)
            tables = self._rope_cache[device] = (cos.to(device), sin.to(device))
        return tables[0][:T], tables[1][:T]

    def forward(self, tokens_BT: torch.Tensor, return_aux_loss: bool = True,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``cache`` (generation only, see ``kv_cache.py``): the tokens are positions ``cache.pos ...``."""
        start = cache.pos if cache is not None else 0
        cos_Th, sin_Th = self.rope(start + tokens_BT.shape[1], tokens_BT.device)
        cos_Th, sin_Th = cos_Th[start:], sin_Th[start:]
        x_BTD = self.embed(tokens_BT)
        if self.cfg.embed_scale:
            x_BTD = x_BTD * math.sqrt(self.cfg.d_model)
        x_BTD = F.dropout(x_BTD, self.cfg.dropout, self.training)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        aux_losses = []
        for i, block in enumerate(self.layers):
            if use_ckpt:
                x_BTD, aux = checkpoint(block, x_BTD, cos_Th, sin_Th, use_reentrant=False)
            elif cache is not None:
                x_BTD, aux = block(x_BTD, cos_Th, sin_Th, cache.layers[i])
            else:
                x_BTD, aux = block(x_BTD, cos_Th, sin_Th)
            aux_losses.append(aux)
        if cache is not None:
            cache.advance(tokens_BT.shape[1])
        logits_BTV = self.lm_head(F.dropout(self.norm(x_BTD), self.cfg.dropout, self.training))
        if not return_aux_loss:
            return logits_BTV, None
        per_layer = torch.stack(aux_losses)
        total = per_layer.sum() if self.cfg.aux_loss_reduction == "sum" else per_layer.mean()
        return logits_BTV, self.cfg.load_balancing_weight * total


MoE18BLLM = MoETransformer

