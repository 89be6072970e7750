"""The seed's parameter names and ours, and the seed model's config in ours.

The seed's model is moe_dist's with ``config.SEED_MODEL_OPTIONS`` (fused qkv, interleaved rotary
pairs, sqrt(d) embedding scale, ...), so a tensor maps to ours unchanged, only renamed:

=====================================================================  ==================================
seed                                                                   moe_dist
=====================================================================  ==================================
``token_embedding.weight``                                             ``embed.weight``
``transformer_blocks.i.attention.qkv.weight`` (3d, d), rows [Q|K|V]    ``layers.i.attn.wqkv.weight``
``transformer_blocks.i.attention.w_o.weight``                          ``layers.i.attn.wo.weight``
``transformer_blocks.i.feed_forward.experts.e.linear1.weight``         ``layers.i.ffn.experts.e.w_up.weight``
``transformer_blocks.i.feed_forward.experts.e.linear2.weight``         ``layers.i.ffn.experts.e.w_down.weight``
``transformer_blocks.i.feed_forward.router.gate.weight``               ``layers.i.ffn.router.weight``
``transformer_blocks.i.norm1.weight`` / ``norm2.weight``               ``layers.i.attn_norm`` / ``ffn_norm``
``norm.weight``                                                        ``norm.weight``
``lm_head.weight`` (the embedding's storage)                           ``lm_head.weight`` (tied)
=====================================================================  ==================================
"""

from __future__ import annotations

import re
from typing import Any, Callable

_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"token_embedding\.weight", lambda m: "embed.weight"),
    (r"transformer_blocks\.(\d+)\.attention\.qkv\.weight", lambda m: f"layers.{m[1]}.attn.wqkv.weight"),
    (r"transformer_blocks\.(\d+)\.attention\.w_o\.weight", lambda m: f"layers.{m[1]}.attn.wo.weight"),
    (r"transformer_blocks\.(\d+)\.feed_forward\.experts\.(\d+)\.linear1\.weight",
     lambda m: f"layers.{m[1]}.ffn.experts.{m[2]}.w_up.weight"),
    (r"transformer_blocks\.(\d+)\.feed_forward\.experts\.(\d+)\.linear2\.weight",
     lambda m: f"layers.{m[1]}.ffn.experts.{m[2]}.w_down.weight"),
    (r"transformer_blocks\.(\d+)\.feed_forward\.router\.gate\.weight", lambda m: f"layers.{m[1]}.ffn.router.weight"),
    (r"transformer_blocks\.(\d+)\.norm1\.weight", lambda m: f"layers.{m[1]}.attn_norm.weight"),
    (r"transformer_blocks\.(\d+)\.norm2\.weight", lambda m: f"layers.{m[1]}.ffn_norm.weight"),
    (r"norm\.weight", lambda m: "norm.weight"),
    (r"lm_head\.weight", lambda m: "lm_head.weight"),
]
_COMPILED = [(re.compile(p + r"$"), f) for p, f in _RULES]


def our_name(seed_name: str) -> str:
    """Our name of one seed parameter; KeyError for a name the seed's model does not have."""
    for rx, f in _COMPILED:
        m = rx.match(seed_name)
        if m:
            return f(m)
    raise KeyError(seed_name)


def seed_names(n_layers: int, num_experts: int) -> list[str]:
    """The seed model's parameter names in its ``named_parameters()`` order (the tied head left out)."""
    out = ["token_embedding.weight"]
    for i in range(n_layers):
        b = f"transformer_blocks.{i}"
        out += [f"{b}.attention.qkv.weight", f"{b}.attention.w_o.weight"]
        for e in range(num_experts):
            out += [f"{b}.feed_forward.experts.{e}.linear1.weight", f"{b}.feed_forward.experts.{e}.linear2.weight"]
        out += [f"{b}.feed_forward.router.gate.weight", f"{b}.norm1.weight", f"{b}.norm2.weight"]
    return out + ["norm.weight"]


def is_muon_param(seed_name: str) -> bool:
    """The seed's split: Muon for every 2-D parameter but the embedding and norms; AdamW for the rest."""
    return not (seed_name.startswith("token_embedding") or "norm" in seed_name)


def muon_order(n_layers: int, num_experts: int) -> list[str]:
    """The seed's Muon parameter list (its optimizer state's int keys index it)."""
    return [n for n in seed_names(n_layers, num_experts) if is_muon_param(n)]


def adamw_order(n_layers: int, num_experts: int) -> list[str]:
    """The seed's AdamW parameter list: embedding, each layer's norm1 and norm2, the final norm."""
    return [n for n in seed_names(n_layers, num_experts) if not is_muon_param(n)]


def to_our_state(seed_state: dict[str, Any]) -> dict[str, Any]:
    """A seed ``model_state_dict`` under our names (the head shares the embedding: kept only if untied)."""
    out = {}
    for k, v in seed_state.items():
        out[our_name(k)] = v
    return out
