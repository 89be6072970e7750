"""The modeling file ``moe-consolidate --format hf`` ships beside a model no transformers class computes
exactly (the seed's architecture: two-matrix SiLU experts, fused qkv, interleaved rotary pairs, a
sqrt(d) embedding scale; or a shared expert). It is copied into the export as ``modeling_moe_dist.py``
and named in ``config.json``'s ``auto_map``, so ::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds it. Self-contained on purpose (torch and transformers only: it runs where moe_dist is not
installed); inference only, no KV cache. Its maths is ``moe_dist.model``'s in eval mode (dropout and
router noise are training-only), and its tensor names are ours under ``model.`` (``lm_head.weight``
at the top, absent when tied), as ``export/hf.py`` writes them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class MoEDistConfig(PretrainedConfig):
    model_type = "moe_dist"

    def __init__(self, vocab_size: int = 320, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 n_kv_heads: Optional[int] = None, d_ff: int = 256, num_experts: int = 8,
                 num_experts_per_tok: int = 2,
                 expert_type: str = "swiglu", shared_expert: bool = False, max_seq_len: int = 128,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-5, embed_scale: bool = False,
                 fused_qkv: bool = False, rope_layout: str = "half", tie_word_embeddings: bool = True,
                 **kwargs) -> None:
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        # top_k is num_experts_per_tok here (as Mixtral's): transformers reads a config's top_k as a sampling setting.
        self.n_kv_heads, self.d_ff, self.num_experts = n_kv_heads, d_ff, num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_type, self.shared_expert, self.max_seq_len = expert_type, shared_expert, max_seq_len
        self.rope_theta, self.norm_eps, self.embed_scale = rope_theta, norm_eps, embed_scale
        self.fused_qkv, self.rope_layout = fused_qkv, rope_layout
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = d_model, n_layers, n_heads
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(cfg: MoEDistConfig, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T, head_dim/2): fp64 angles for the 'half' layout, fp32 for 'interleaved' (torchtune's)."""
    hd = cfg.d_model // cfg.n_heads
    dt = torch.float64 if cfg.rope_layout == "half" else torch.float32
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device="cpu")[: hd // 2].to(dt) / hd))
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=dt, device="cpu"), inv)[:T]  # on the host, then moved
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    xf = x.float()
    if layout == "interleaved":  # pairs (2i, 2i + 1)
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2).to(x.dtype)
    x1, x2 = xf.chunk(2, dim=-1)  # pairs (i, i + head_dim/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: MoEDistConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.h, self.g, self.hd = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads
        q, kv = self.h * self.hd, self.g * self.hd
        if cfg.fused_qkv:
            self.wqkv = nn.Linear(cfg.d_model, q + 2 * kv, bias=False)
        else:
            self.wq, self.wk = nn.Linear(cfg.d_model, q, bias=False), nn.Linear(cfg.d_model, kv, bias=False)
            self.wv = nn.Linear(cfg.d_model, kv, bias=False)
        self.wo = nn.Linear(q, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cfg.fused_qkv:
            q, k, v = self.wqkv(x).split([self.h * self.hd, self.g * self.hd, self.g * self.hd], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.reshape(B, T, self.h, self.hd).transpose(1, 2)
        k = k.reshape(B, T, self.g, self.hd).transpose(1, 2)
        v = v.reshape(B, T, self.g, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin, self.cfg.rope_layout), rotate(k, cos, sin, self.cfg.rope_layout)
        if self.g != self.h:
            k, v = k.repeat_interleave(self.h // self.g, 1), v.repeat_interleave(self.h // self.g, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.h * self.hd))


class Expert(nn.Module):
    def __init__(self, cfg: MoEDistConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.expert_type == "swiglu" else None
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w_gate(x)) * self.w_up(x) if self.w_gate is not None else F.silu(self.w_up(x))
        return self.w_down(h)


class MoE(nn.Module):
    """fp32 softmax over the experts, top-k, the k weights renormalised to sum to 1."""

    def __init__(self, cfg: MoEDistConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_experts))
        self.shared_expert = Expert(cfg) if cfg.shared_expert else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        probs = torch.softmax(self.router(x2).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x2)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                y.index_add_(0, tok, expert(x2[tok]) * w[tok, slot].unsqueeze(1).to(x.dtype))
        if self.shared_expert is not None:
            y = y + self.shared_expert(x2)
        return y.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: MoEDistConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.d_model, cfg.norm_eps), MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class MoEDistPreTrainedModel(PreTrainedModel):
    config_class = MoEDistConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MoEDistModel(MoEDistPreTrainedModel):
    def __init__(self, cfg: MoEDistConfig) -> None:
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_tables(self.config, input_ids.shape[1], input_ids.device)
        x = self.embed(input_ids)
        if self.config.embed_scale:
            x = x * math.sqrt(self.config.d_model)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.norm(x)


class MoEDistForCausalLM(MoEDistPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, cfg: MoEDistConfig) -> None:
        super().__init__(cfg)
        self.model = MoEDistModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids[:, -self.config.max_seq_len:]}  # no KV cache: the whole context

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutput:
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)
